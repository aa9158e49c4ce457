from logger.logger import progress_bar, setup_logging
from logger.visualization import MetricsCSV, RunOutputs
