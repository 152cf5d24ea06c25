#!/usr/bin/env python3
"""Prunes superseded build outputs of this workspace's own crates from a Cargo target directory.

CI keeps one target directory across fresh clones (ci/test.sh). Every change to our sources makes
new hashed outputs for our crates (test binaries with debug info, libraries) and leaves the old ones
behind, so the directory grows by a gigabyte or two a landing; dependency outputs barely change.
This removes, per workspace target, all but the newest KEEP outputs of each kind (executables by
name, `lib<name>-*.rlib` / `.rmeta`), which Cargo would rebuild if it ever wanted them again.
Dependency outputs are never touched: their names may equal a test's (`tracing`, `metrics`).

usage: prune_target.py TARGET_DIR   (run from the workspace root; prints what it freed)
"""

import json
import os
import re
import subprocess
import sys
from collections import defaultdict

# Outputs kept per (target, kind): a library has check (clippy) and build variants; a binary name
# can be the bin itself, its test harness and a lib's unit-test harness.
KEEP = 3
HASHED = re.compile(r"^(?P<stem>.+)-[0-9a-f]{16}(?P<ext>\.rlib|\.rmeta)?$")


def workspace_targets() -> tuple[set[str], set[str]]:
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--no-deps", "--format-version", "1"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    executables, libraries = set(), set()
    for package in meta["packages"]:
        for target in package["targets"]:
            name = target["name"].replace("-", "_")
            if name == "build_script_build":
                continue
            if {"lib", "rlib"} & set(target["kind"]):
                libraries.add(name)
            # Every target may have a test harness executable of its own name.
            executables.add(name)
    return executables, libraries


def prune(target_dir: str) -> None:
    executables, libraries = workspace_targets()
    freed = removed = 0
    for profile in ("debug", "release"):
        deps = os.path.join(target_dir, profile, "deps")
        if not os.path.isdir(deps):
            continue
        groups: dict[tuple[str, str], list[tuple[float, str, int]]] = defaultdict(list)
        for entry in os.scandir(deps):
            m = HASHED.match(entry.name)
            if not m or not entry.is_file(follow_symlinks=False):
                continue
            stem, ext = m["stem"], m["ext"] or ""
            if ext:
                ours = stem.startswith("lib") and stem[3:] in libraries
            else:
                ours = stem in executables and os.access(entry.path, os.X_OK)
            if ours:
                st = entry.stat(follow_symlinks=False)
                groups[(stem, ext)].append((st.st_mtime, entry.path, st.st_size))
        for outputs in groups.values():
            outputs.sort(reverse=True)
            for _, path, size in outputs[KEEP:]:
                os.remove(path)
                freed += size
                removed += 1
    print(f"==> pruned {removed} superseded workspace outputs, {freed / 2**30:.1f} GiB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    prune(sys.argv[1])
