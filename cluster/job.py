"""Entry point for `ray job submit ... -- python -m cluster.job CONFIG [tadrop merge flags]`.

It is `tadrop merge --executor ray` run as the job's driver: Ray sets $RAY_ADDRESS for it, so the
executor joins the cluster, and every actor inherits the job's working_dir (this code). The driver's
current directory is Ray's private copy of that working_dir, different on every node and deleted
later, so paths in the config must be absolute on the shared filesystem (or relative to --chdir);
an output that would land inside that copy is refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _split(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take our own --chdir out; the rest are `tadrop merge` flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--chdir", type=Path)
    ours, rest = pre.parse_known_args(argv)
    return ours.chdir, rest


def _inside_ray_package(path: Path) -> bool:
    """True when `path` lies in the job's uploaded working_dir copy (Ray names it _ray_pkg_<hash>)."""
    cwd = Path.cwd().resolve()
    return any(p.name.startswith("_ray_pkg_") for p in (cwd, *cwd.parents)) and path.is_relative_to(cwd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nFlags: --chdir DIR (resolve relative config paths there), then those of "
              "`tadrop merge` (see `tadrop merge --help`); --executor defaults to ray.")
        return 0
    chdir, rest = _split(argv)
    if chdir is not None:
        os.chdir(chdir)
    if "--executor" not in rest and not any(a.startswith("--executor=") for a in rest):
        rest += ["--executor", "ray"]

    from pipeline import cli
    from pipeline.config import ConfigError, load_config

    args = cli._parser().parse_args(["merge", *rest])
    try:
        cfg = load_config(args.config, {"output": args.output or args.output_pos})
    except ConfigError as e:
        print(f"tadrop: error: {e}", file=sys.stderr)
        return 1
    if _inside_ray_package(cfg.output):
        print(f"tadrop: error: output {cfg.output} lies inside this job's temporary copy of the working_dir; "
              "give an absolute output on the shared filesystem (in the config or --output), or --chdir DIR",
              file=sys.stderr)
        return 1
    return cli.main(["merge", *rest])


if __name__ == "__main__":
    sys.exit(main())
