"""The report task: summary.parquet, the figures and summary.md, rebuilt only when the tables change."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from rumflow.artifacts.checkpoints import file_digest
from rumflow.tasks.caching import cached_task
from rumflow.tasks.records import record_type

# What decides the report besides the tables: its builder, the plots, the derived columns, the intervals.
REPORT_CODE = ("rumflow.artifacts.report", "rumflow.artifacts.plots", "rumflow.artifacts.tables",
               "rumflow.metrics", "rumflow.stats")


@record_type
class Report(BaseModel):
    """The report's files (relative to the run folder) and the sha256 of each."""

    model_config = ConfigDict(frozen=True)
    files: dict[str, str]

    def intact(self, run_dir: str | Path) -> bool:
        return all((Path(run_dir) / rel).is_file() and file_digest(Path(run_dir) / rel) == sha
                   for rel, sha in self.files.items())


def table_digests(run_dir: Path, tables: list[Path]) -> dict[str, str]:
    """The report task's keyed input: each table's path relative to the run folder and its sha256."""
    return {Path(p).relative_to(run_dir).as_posix(): file_digest(Path(p)) for p in tables}


@cached_task("report", run_name="report {label}", code=REPORT_CODE)
def report_task(tables: dict[str, str], workdir: str, label: str = "") -> Report:
    """Build the report of the run folder from its tables; `tables` (their digests, just written by the
    run that holds the folder) is the key, so an unchanged re-run reads the report it made before."""
    from rumflow.artifacts.report import build_report  # matplotlib and scipy: imported only to build

    run_dir = Path(workdir)
    return Report(files={Path(p).relative_to(run_dir).as_posix(): file_digest(Path(p))
                         for p in build_report(run_dir)})
