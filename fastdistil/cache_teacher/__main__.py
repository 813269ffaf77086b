import sys

from fastdistil.cache_teacher.command import cli

sys.exit(cli())
