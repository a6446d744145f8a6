r"""A workdir's evaluation records as one table, one row per checkpoint step and protocol.

  python -m experiments.results --workdir=workdir/digits [--step=3000] [--json]

Each ``--mode=eval`` (and each evaluation during training) keeps its own record under
``{workdir}/eval/{protocol_id}/step_{step}.json`` (:mod:`vdm_jax.runner.results`), so the
ELBO, ODE and importance-weighted figures of one checkpoint are listed side by side.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from vdm_jax.runner import results

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Only this checkpoint step's records.")
_JSON = flags.DEFINE_bool("json", False, "Print the records as JSON lines instead.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    records = results.load(_WORKDIR.value, _STEP.value)
    if not records:
        which = "" if _STEP.value is None else f" at step {_STEP.value}"
        sys.exit(f"No evaluation records{which} in {_WORKDIR.value}; run --mode=eval first.")
    if _JSON.value:
        for path, record in records:
            print(json.dumps({"path": path, **record}, sort_keys=True))
    else:
        print(results.table(records))


if __name__ == "__main__":
    app.run(main)
