"""Preloaded into multiprocessing's fork server by ``pipeline.orphans.forkserver``: importing it
makes the fork server end with the process that started it. Nothing else imports it."""
from pipeline.orphans import die_with_parent

die_with_parent()
