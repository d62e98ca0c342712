"""Flower's settings for lesson 11: ``celery -A security1 flower --conf=flower1.py``.

Flower runs this file and takes the names it knows (``port``, ``address``, ``basic_auth``...).
The user name and password come from the environment: FLOWER_USER and FLOWER_PASSWORD.
"""

import os

port = 5555
# Why: /metrics and /healthcheck answer without a password even with basic_auth set; listening
# on 127.0.0.1 only keeps them (and everything else) off the network. Put a proxy in front.
address = "127.0.0.1"
# Why: without it the web pages are open to anyone who reaches the port. The password comes
# from the environment, never from this file (it would end up in git).
basic_auth = [f"{os.environ['FLOWER_USER']}:{os.environ['FLOWER_PASSWORD']}"]
