"""Train with D-OPSD (or baseline SFT) on Ray.

    python jobs/train.py                                   # the CPU miniature: a toy turbo model learns "sks"
    python jobs/train.py --config configs/zimage_turbo_lora.yaml data.path=s3://bucket/shards
    ray job submit -- python jobs/train.py --config configs/zimage_turbo_lora.yaml

Overrides are section.key=value (YAML values), e.g. optim.lr=5e-5 runtime.mode=disaggregated.
Re-running with the same train.run_name resumes from the last checkpoint.
SIGTERM or SIGINT (Ctrl-C, `ray job stop`) stops the run after the current step with a checkpoint
there (the MLflow run ends KILLED; exit status 128 + the signal's number); a second one stops it
at once. Under `ray job submit`, a relative train.output_dir lands under ~/dopsd-ray on the
driver's node (Ray deletes the job's working dir).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, e.g. under `ray job submit`

from dopsd_ray.config import ConfigError  # noqa: E402
from dopsd_ray.recipes import config_from_cli  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, cfg = config_from_cli(parser, argv)

    from dopsd_ray.driver import train
    from dopsd_ray.stop import RunStopped
    from dopsd_ray.storage import Storage

    try:
        summary = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # too many non-finite steps in a row: the message names the last checkpoint
        print(f"error: training stopped: {err}", file=sys.stderr)
        return 1
    except RunStopped as err:  # SIGTERM / SIGINT: stopped cleanly, with a checkpoint to resume from
        print(f"error: {err}", file=sys.stderr)
        return 128 + err.signum
    print("\n== dopsd-ray: done ==")
    print(f"run directory:   {summary['run_dir']}")
    print(f"exported weights: {summary['export']}")
    print(f"last checkpoint: {summary['checkpoint']}")
    print(f"MLflow run:      {summary['mlflow_run_id']}")
    print(f"  browse with:   {summary['mlflow_ui']}")
    Storage(summary["run_dir"]).write("summary.json", json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
