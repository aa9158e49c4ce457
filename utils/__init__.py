from utils.errors import CheckpointError, ConfigError, DataError, TrainingError, UserError
from utils.util import (atomic_write_bytes, atomic_write_text, get_rng_state, set_rng_state,
                        seed_everything, unwrap_model, prepare_device, write_json)
