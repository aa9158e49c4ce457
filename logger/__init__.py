from logger.logger import setup_logging
from logger.visualization import MetricsCSV, TensorboardWriter
