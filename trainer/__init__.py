from trainer.trainer import Trainer
