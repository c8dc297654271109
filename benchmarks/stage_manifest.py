"""Record which commit a GPU call runs: writes ``.gpu/manifest.json`` with ``HEAD`` and the
sha256 of the ``frugal_dist`` sources, refusing a checkout whose ``frugal_dist/`` has uncommitted
edits. ``bench_common.git_info`` on the GPU machine compares its copy's sources with it, so the
results' ``code`` block names the commit even where the copy's git metadata is stale.

    python benchmarks/stage_manifest.py        # after ../shared/gpu/stage.sh, before `run`
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench_common import MANIFEST, REPO, sources_sha256


def main() -> int:
    git = ["git", "-C", str(REPO)]
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "frugal_dist"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    if dirty.strip():
        print(f"frugal_dist/ has uncommitted edits; commit them first:\n{dirty}", file=sys.stderr)
        return 1
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    out = REPO / MANIFEST
    out.parent.mkdir(exist_ok=True)
    manifest = {"commit": commit, "frugal_dist_sources_sha256": sources_sha256(REPO)}
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
