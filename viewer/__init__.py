"""``searchgym view``: a read-only local web page over training and eval runs, episode by episode.

Layout: :mod:`.index` indexes a JSONL file once by byte offsets; :mod:`.episodes` turns a training
sample or an eval prediction into the viewer's records; :mod:`.runs` finds runs in folders;
:mod:`.filters`, :mod:`.compare` and :mod:`.charts` are the list filters, the side-by-side comparison and
the SVG curves; :mod:`.app` wires them into Flask routes; :mod:`.cli` declares the subcommand.
"""
