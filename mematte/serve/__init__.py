"""``mematte serve``: matting over HTTP (FastAPI + uvicorn), with a page to try it.

Imported only by ``mematte serve``: importing :mod:`mematte` never imports FastAPI.
:mod:`.command` builds the command line, :mod:`.app` the application, :mod:`.worker` runs
the model on one thread behind a bounded queue, :mod:`.limits` guards the request body.
"""
