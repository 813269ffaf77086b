import sys

from fastdistil.train.loop import cli

sys.exit(cli())
