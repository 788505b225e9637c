"""The Flask application: read-only pages over the runs given to ``searchgym view``.

Pages: ``/`` (the runs), ``/run/<n>`` (a run's episodes, filtered and paginated), ``/run/<n>/episode/<line>``
(one episode), ``/run/<n>/curves`` (a training run's curves), ``/compare`` (two runs, or two steps of a
training run, side by side). Every request answers a page: bad input is a 4xx page saying what was wrong,
never a traceback.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from flask import Flask, abort, render_template, request
from werkzeug.exceptions import HTTPException

from searchgym.errors import SearchgymError
from searchgym.viewer.charts import curves, line_chart, read_metrics
from searchgym.viewer.compare import compare
from searchgym.viewer.filters import EpisodeFilter, Page
from searchgym.viewer.highlight import highlight
from searchgym.viewer.index import RecordNotFound
from searchgym.viewer.runs import Run, RunKind

_log = logging.getLogger(__name__)


def create_app(runs: Sequence[Run]) -> Flask:
    """The viewer's application over ``runs`` (see :func:`searchgym.viewer.runs.find_runs`)."""
    app = Flask(__name__)
    app.config["RUNS"] = list(runs)
    app.jinja_env.filters["highlight"] = highlight
    app.jinja_env.filters["num"] = _number
    app.jinja_env.globals["query_with"] = _query_with
    app.add_url_rule("/", view_func=_home)
    app.add_url_rule("/run/<int:number>", view_func=_episodes)
    app.add_url_rule("/run/<int:number>/episode/<int:line>", view_func=_episode)
    app.add_url_rule("/run/<int:number>/curves", view_func=_curves)
    app.add_url_rule("/compare", view_func=_compare)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RecordNotFound, lambda error: _error_page(404, str(error)))
    app.register_error_handler(SearchgymError, lambda error: _error_page(400, str(error)))
    app.register_error_handler(Exception, _unexpected_error)
    return app


# ---------------------------------------------------------------------------------------------- pages
def _home() -> str:
    runs = _runs()
    for run in runs:
        run.episodes.refresh()
    return render_template("home.html", runs=runs, eval_runs=[r for r in runs if r.kind is RunKind.EVAL])


def _episodes(number: int) -> str:
    run = _run(number)
    summaries = run.summaries()
    chosen = EpisodeFilter.from_query(request.args)
    matching = chosen.select(run.columns())
    page = Page.from_query(request.args, len(matching))
    return render_template(
        "episodes.html",
        run=run,
        filter=chosen,
        page=page,
        episodes=[summaries[i] for i in matching[page.start : page.stop]],
        overview=run.overview(),
        total=len(summaries),
    )


def _episode(number: int, line: int) -> str | tuple[str, int]:
    run = _run(number)
    try:
        detail = run.detail(line)
    except (ValueError, KeyError, TypeError) as error:
        return _error_page(422, f"{run.episodes.path}, line {line}, is not an episode record ({error})")
    return render_template("episode.html", run=run, episode=detail)


def _curves(number: int) -> str:
    run = _run(number)
    metrics = read_metrics(run.metrics_path)
    charts = [(curve, line_chart(curve)) for curve in curves(metrics.rows)]
    return render_template("curves.html", run=run, charts=charts, metrics=metrics)


def _compare() -> str:
    runs = _runs()
    if not runs:
        abort(404)
    side_a = _side(request.args, "a", default_run=0)
    side_b = _side(request.args, "b", default_run=min(1, len(runs) - 1))
    comparison = compare(side_a.episodes, side_b.episodes)
    dataset, example_id = request.args.get("dataset"), request.args.get("example_id")
    pair = None
    if dataset is not None and example_id is not None:
        pair = [_first_detail(side, (dataset, example_id)) for side in (side_a, side_b)]
    return render_template("compare.html", runs=runs, a=side_a, b=side_b, comparison=comparison, pair=pair)


# ---------------------------------------------------------------------------------------------- helpers
class _Side:
    """One side of a comparison: a run, and a step for a training run."""

    def __init__(self, run: Run, step: int | None) -> None:
        self.run = run
        self.step = step
        self.episodes = [e for e in run.summaries() if step is None or e.step == step]

    @property
    def label(self) -> str:
        return self.run.label if self.step is None else f"{self.run.label} step {self.step}"


def _side(query: Mapping[str, str], name: str, *, default_run: int) -> _Side:
    run = _run(_integer(query, name, default_run))
    steps = run.steps() if run.kind is RunKind.TRAIN else []
    default_step = None if not steps else steps[0] if name == "a" else steps[-1]
    step = _integer(query, f"step_{name}", default_step) if steps else None
    if steps and step not in steps:
        raise SearchgymError(
            f"{run.label} has no episodes at step {step}: its steps are {steps[0]}..{steps[-1]}"
        )
    return _Side(run, step)


def _first_detail(side: _Side, key: tuple[str, str]) -> Any:
    found = next((episode for episode in side.episodes if episode.key == key), None)
    return None if found is None else side.run.detail(found.line)


def _integer(query: Mapping[str, str], name: str, default: int | None) -> Any:
    raw = query.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise SearchgymError(f"{name} must be an integer, got {raw!r}") from error


def _runs() -> list[Run]:
    from flask import current_app

    return current_app.config["RUNS"]


def _run(number: int) -> Run:
    runs = _runs()
    if not 0 <= number < len(runs):
        raise RecordNotFound(f"no run number {number}: this viewer serves runs 0 to {len(runs) - 1}")
    return runs[number]


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _query_with(**changes: Any) -> str:
    """The current query string with ``changes`` applied (None removes a key)."""
    query = {key: value for key, value in request.args.items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = str(value)
    return "?" + urlencode(query)


def _error_page(status: int, message: str) -> tuple[str, int]:
    return render_template("error.html", status=status, message=message), status


def _http_error(error: HTTPException) -> tuple[str, int]:
    return _error_page(error.code or 500, error.description or error.name)


def _unexpected_error(error: Exception) -> tuple[str, int]:
    _log.exception("searchgym view: unexpected error")
    return _error_page(500, f"the viewer failed on this page ({type(error).__name__}: {error})")
