"""The HTTP layer: the app, the server, sign-in, sessions, the page and the
routes per area. It reads state and writes only through the pipeline and
commands; nothing but the daemon imports it.
"""
