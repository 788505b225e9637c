"""PNG curves of a finished (or running) training run, drawn from its metrics.jsonl."""

from pathlib import Path

from searchgym.train.tracking import read_metrics

# (metric, panel title); a panel whose metric the run never logged is left out.
CURVES = (
    ("rollout/reward", "train reward"),
    ("dev/em", "dev exact match (greedy)"),
    ("rollout/policy_tokens", "policy tokens per episode"),
    ("rollout/searches", "searches per episode"),
    ("actor/entropy", "policy entropy"),
    ("experience/kl", "KL to reference"),
)


def plot_run(metrics_path: Path, target: Path) -> Path | None:
    """Draw the curves of :data:`CURVES` into one PNG at ``target``; None when nothing was logged."""
    import matplotlib  # imported only when plotting: it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = []
    for name, title in CURVES:
        points = [(row["step"], row[name]) for row in rows if row.get(name) is not None]
        if points:
            panels.append((title, points))
    if not panels:
        return None
    columns = min(3, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        rows_of_panels, columns, figsize=(4.2 * columns, 3.2 * rows_of_panels), squeeze=False
    )
    for axis, (title, points) in zip(axes.flat, panels, strict=False):
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target
