"""What ``optimizer_step.py`` records and shows: the code version and hardware measured on, the
markdown table of the results, and the bar chart (matplotlib, optional).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch
from optimizer_step_setup import REPO  # noqa: F401 -- puts the checkout on sys.path if needed

import frugal_dist


def code_version() -> dict[str, Any]:
    """Which frugal_dist was measured: its path, a hash of its sources, and git state if any."""
    import hashlib
    import subprocess

    pkg = Path(frugal_dist.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    info: dict[str, Any] = {
        "frugal_dist_path": str(pkg),
        "frugal_dist_sources_sha256": h.hexdigest(),
    }
    try:
        git = ["git", "-C", str(pkg.parent)]
        info["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "frugal_dist"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        info["frugal_dist_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu_model"] = platform.processor() or "unknown"
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
    return info


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    base = next(
        (r["state_bytes"] for r in rows if r["name"] == "adamw_foreach" and not r["skipped"]), None
    )
    base_ms = next(
        (r["median_ms"] for r in rows if r["name"] == "adamw_foreach" and not r["skipped"]), None
    )
    cuda = device == "cuda"
    head = [
        "variant",
        "median ms",
        "mean ms",
        "× AdamW time",
        "refresh ms (step 0)",
        "refresh ms (later)",
        "state MiB",
        "state / AdamW",
        "aux KiB",
        "state = formula",
    ]
    if cuda:
        head.append("step peak extra MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r["skipped"]:
            cells = [r["label"], "skipped"] + [""] * (len(head) - 3) + [r.get("note", "")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            r["label"],
            f"{r['median_ms']:.1f}",
            f"{r['mean_ms']:.1f}",
            "-" if not base_ms else f"{r['median_ms'] / base_ms:.2f}",
            f"{r['refresh_ms']:.1f}",
            "-" if r["refresh2_ms"] is None else f"{r['refresh2_ms']:.1f}",
            fmt_mib(r["state_bytes"]),
            "-" if not base else f"{r['state_bytes'] / base:.3f}",
            f"{r['aux_bytes'] / 1024:,.1f}",
            "yes" if r["state_matches_formula"] else "NO",
        ]
        if cuda:
            cells.append(fmt_mib(r.get("step_peak_extra_bytes")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    ok = [r for r in rows if not r["skipped"]]
    labels = [r["label"] for r in ok]
    colors = [
        "#888888" if r["kind"] == "torch" else ("#c9a0dc" if r["diagnostic"] else "#1f77b4")
        for r in ok
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.45 * len(ok) + 2.2), sharey=True)
    y = range(len(ok))
    axes[0].barh(y, [r["median_ms"] for r in ok], color=colors)
    axes[0].set_xlabel("median step time (ms)")
    axes[1].barh(y, [r["refresh_ms"] for r in ok], color=colors, label="step 0")
    axes[1].scatter(
        [r["refresh2_ms"] if r["refresh2_ms"] is not None else float("nan") for r in ok],
        list(y),
        color="k",
        marker="|",
        s=200,
        label="later refresh",
        zorder=3,
    )
    axes[1].set_xlabel("refresh step time (ms)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes[1].legend(
        handles=[
            Patch(facecolor="#bbbbbb", label="step 0 (bar)"),
            Line2D(
                [],
                [],
                color="k",
                marker="|",
                linestyle="none",
                markersize=12,
                label="later refresh",
            ),
        ],
        loc="lower right",
        fontsize=8,
    )
    axes[2].barh(y, [r["state_bytes"] / 2**20 for r in ok], color=colors)
    axes[2].set_xlabel("optimizer state (MiB)")
    axes[0].set_yticks(list(y))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
