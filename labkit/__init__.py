"""labkit: the Celery Labs harness (grader, embedded broker, worker fixtures, CLI).

It holds no lesson content: lessons live in lessons/, solutions/, notebooks/
and tests/, and course.toml lists them.
"""
