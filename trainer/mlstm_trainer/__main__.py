"""`python -m mlstm_trainer [flags]`: parse the config, build a Trainer, train, tear down."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cell import cell_choice
from .checkpoint import CheckpointError
from .config import ConfigError
from .corpus import CorpusError
from .distributed import init_distributed, shutdown_distributed
from .hostmem import keep_freed_host_memory
from .metrics import MetricsPortError
from .options import load_config
from .recurrent_matmul import matmul_choice
from .sampling import sample_text
from .shards import ManifestError
from .storage import StorageError
from .trainer import Trainer

# Bad settings or inputs the user can fix: exit 2. A store failing mid-run (S3 down, corrupt shard): exit 1.
USAGE_ERRORS = (ConfigError, CorpusError, CheckpointError, MetricsPortError, ManifestError)
RUNTIME_ERRORS = (StorageError,)


def main(argv: Sequence[str] | None = None, prog: str = "mlstm train") -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
        cell_choice()  # a bad MLSTM_CELL or MLSTM_RECURRENT_MATMUL stops here, before anything is written
        matmul_choice()
        keep_freed_host_memory()  # before the model and the first step allocate (hostmem.py says why)
        ctx = init_distributed(config.device, config.dist_timeout_seconds)
        try:
            trainer = Trainer(config, ctx)
            state = trainer.train(show_progress=sys.stderr.isatty())
        finally:
            shutdown_distributed()
    except USAGE_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except RUNTIME_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    if ctx.is_main:
        print(f"trained {state.step} steps, {state.tokens_seen:,} characters; checkpoints in {config.checkpoint.dir}")
        if config.sample_chars:
            print("--- sample ---")
            print(sample_text(trainer.model.eval(), length=config.sample_chars, temperature=0.8, seed=config.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
