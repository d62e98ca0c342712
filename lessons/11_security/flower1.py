"""Flower's settings for lesson 11: ``celery -A security1 flower --conf=flower1.py``.

Flower runs this file and takes the names it knows (``port``, ``address``, ``basic_auth``...).
The user name and password come from the environment: FLOWER_USER and FLOWER_PASSWORD.
"""

import os

port = 5555
address = "0.0.0.0"
# TODO 6: protect Flower with HTTP basic auth: one user, FLOWER_USER and FLOWER_PASSWORD from
#         the environment. And which address should it listen on? See the README.
