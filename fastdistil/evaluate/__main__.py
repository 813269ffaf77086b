import sys

from fastdistil.evaluate.finetune import cli

sys.exit(cli())
