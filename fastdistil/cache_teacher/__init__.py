"""python -m fastdistil.cache_teacher: the teacher run once over the data, its top-k outputs kept on disk for any
number of students trained with python -m fastdistil.train --teacher-cache (command; the format is
fastdistil.train.teacher_cache)."""

from fastdistil.cache_teacher.command import CacheConfig, cli, main, parse_args

__all__ = ["CacheConfig", "cli", "main", "parse_args"]
