"""Issue 13, item 9: output names are checked against the file system's limit when planning
(every name, --name templates included), and a legal name of 241 to 255 bytes can be written:
the temporary name beside it used to add 15 bytes and fail at write time, after the model ran."""

from __future__ import annotations

import json
import os

import pytest
from hardening import pasd_in_process
from PIL import Image

from pasd_cli.atomic import write_atomic
from pasd_cli.batch.plan import name_max

NO_MODEL = ["--pasd", "/no/such/checkpoint", "--caption", "none", "--device", "cpu"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (16, 12), "red").save(path)
    return path


@pytest.mark.parametrize("length", [241, 250, 255])
def test_a_legal_name_of_up_to_255_bytes_is_written(tmp_path, length):
    limit = name_max(tmp_path)
    target = tmp_path / ("é" * ((min(length, limit) - 4) // 2) + "x" * ((min(length, limit) - 4) % 2) + ".png")
    assert len(os.fsencode(target.name)) == min(length, limit)
    write_atomic(target, lambda handle: handle.write(b"data"))
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [target.name]


def test_a_name_over_the_limit_fails_its_input_when_planning(capsys, tmp_path, photo):
    """Found before the model is even resolved: the run never gets to its missing model."""
    long = "{stem}_" + "x" * 300
    out = tmp_path / "out"
    dry = pasd_in_process(capsys, "upscale", photo, "-o", out, "--name", long, "--dry-run", "--json")
    record = json.loads(dry.stdout.splitlines()[0])
    assert dry.code == 1 and record["status"] == "failed"
    assert f"the output name is {len('photo_') + 300 + 4} bytes" in record["reason"]

    run = pasd_in_process(capsys, "upscale", photo, "-o", out, "--name", long, *NO_MODEL)
    assert run.code == 1, run.stderr  # not 3: no model was needed
    assert "use a shorter --name" in run.one_error()
    assert not (out / ".pasd-failures.json").exists()  # not the input's fault: tried again next time
