import sys

from fastdistil.export.command import cli

sys.exit(cli())
