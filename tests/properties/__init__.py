"""The queue's core as a hypothesis state machine: test_queue_machine.py puts it together
from the rules of this folder's modules and runs it on each store."""
