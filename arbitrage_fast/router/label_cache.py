"""Router labels kept per problem on disk.

Labelling a real pair costs about a minute of both models per problem, so a router worth
deploying takes hours of labelling. Keeping each problem's labels in its own file lets an
interrupted run resume where it stopped, lets any later run (another `--n` or seed) reuse
every problem already labelled, and lets `eval-router` share the held-out problems' labels
between routers.
A manifest names what made the labels (models, PRM, token cap, dtype, ...); a cache made
differently is refused rather than mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .data import RouterDataset

MANIFEST = "labels.json"


class LabelCache:
    def __init__(self, directory: str | Path, run_info: dict):
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if manifest.is_file():
            made_by = json.loads(manifest.read_text()).get("run") or {}
            if made_by != run_info:
                differ = sorted(k for k in set(made_by) | set(run_info) if made_by.get(k) != run_info.get(k))
                raise ValueError(f"label cache {self.directory} was made with other settings (differs in {differ}); "
                                 "pass another --label-cache directory")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps({"run": run_info}, indent=1) + "\n")

    def path(self, item_id: str) -> Path:
        """A readable, collision-free file name: the id's safe characters plus a hash of all of it."""
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", item_id).strip("._")[:80]
        digest = hashlib.sha256(item_id.encode()).hexdigest()[:12]
        return self.directory / f"{readable}-{digest}.safetensors"

    def get(self, item_id: str) -> tuple[RouterDataset, float] | None:
        """(labels, seconds it took to make them) of a problem, or None if it is not cached."""
        path = self.path(item_id)
        if not path.is_file():
            return None
        data, meta = RouterDataset.load_with_metadata(path)
        if meta.get("item") != item_id:
            raise ValueError(f"{path} holds labels of {meta.get('item')!r}, not {item_id!r}")
        return data, float(meta["seconds"])

    def put(self, item_id: str, data: RouterDataset, seconds: float) -> None:
        """Written to a temporary name and renamed, so an interruption never leaves half a file."""
        path = self.path(item_id)
        partial = path.with_suffix(".partial")
        data.save(partial, metadata={"item": item_id, "seconds": repr(seconds)})
        os.replace(partial, path)
