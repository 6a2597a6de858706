"""Runs AffinityNet stages from the command line.

  python -m affinity_jax.main --config=configs/scenes.py --workdir=/tmp/scenes

`--mode` picks one stage (`train_cam`, `infer_cam`, `aff_labels`, `train_aff`,
`infer_rw`, `train_seg`, `eval`) or `all` (the default), which runs every stage in
order and skips those whose outputs are complete. Rerunning a killed command resumes.
"""

from typing import Sequence

from affinity_jax import config_lib


def main(argv: Sequence[str]) -> None:
  from absl import logging  # TFDS logs a warning per custom scenes config; keep errors.
  logging.set_verbosity(logging.ERROR)
  from affinity_jax.stages import pipeline  # Heavy imports after argument errors.

  cl = config_lib.parse_command_line(argv, modes=pipeline.MODES)
  pipeline.run(cl.config, cl.config_name, cl.workdir, cl.mode)


if __name__ == "__main__":
  from affinity_jax import runtime
  runtime.restart_with_huge_pages()
  config_lib.run_main(main)
