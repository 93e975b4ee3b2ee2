"""mlstm_trainer: what runs in each training pod (config, model, data streams, checkpoints, metrics, loop)."""

__version__ = "0.1.0"
