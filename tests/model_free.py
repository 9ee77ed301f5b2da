"""A command without a model, for tests of the batch around it: its transform is a bicubic
enlargement, so jobs read, decode, write and record real images in a fraction of a second."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from pasd_cli.batch.command import ImageCommand
from pasd_cli.batch.runner import run_batch
from pasd_cli.batch.settings import BatchSettings
from pasd_cli.errors import PasdError


class Enlarge(ImageCommand):
    scale = 2

    def __init__(self, batch: BatchSettings):
        super().__init__(batch)
        self.loads = 0

    @property
    def seed(self) -> int | None:
        return None

    def name_fields(self) -> dict[str, str]:
        return {"scale": str(self.scale)}

    def planned_size(self, size):
        return size[0] * self.scale, size[1] * self.scale

    def load(self, reporter) -> None:
        self.loads += 1

    def transform(self, rgb, job, progress) -> tuple[Image.Image, dict[str, Any]]:
        return rgb.resize((rgb.width * self.scale, rgb.height * self.scale), Image.Resampling.BICUBIC), {}

    def record(self) -> dict[str, Any]:
        return {"command": "enlarge"}


def run_enlarge(capsys, inputs, output, **options) -> tuple[dict[str, dict], dict, int]:
    """Run the batch in-process with --json: records by input path, the summary and the exit code
    the command line would give (0, 1, or a PasdError's)."""
    batch = BatchSettings(inputs=tuple(str(i) for i in inputs), output=str(output), json=True, **options)
    capsys.readouterr()
    try:
        code = run_batch(Enlarge(batch), batch, stdin=io.StringIO()).exit_code
    except PasdError as exc:
        code = exc.exit_code
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = {str(Path(r["input"])): r for r in lines if r["type"] == "image"}
    summaries = [r for r in lines if r["type"] == "summary"]
    return records, (summaries[0] if summaries else {}), code
