"""``python -m queuectl.progress_view``: draws a command's progress bar on standard error
from what the command writes to its standard input (see ``queuectl.progress``)."""

import signal
import sys

from queuectl.progress import view

# Ctrl-C is the command's to handle: the bar ends when the command closes the pipe (or
# exits), with its last frame drawn.
signal.signal(signal.SIGINT, signal.SIG_IGN)
view(sys.stdin.buffer)
