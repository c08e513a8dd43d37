"""HQ's commands back to the box: the handlers per command and the journal
of command ids already run.
"""
