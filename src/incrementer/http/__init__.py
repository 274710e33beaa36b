"""A small HTTP/1.1 server on uvloop + httptools: no framework, no business logic.

The layer below the application: it imports nothing else from the package. An application
subclasses Handler (what a connection calls) and Gate (when answers may leave) and gives both to
HttpServer; each request arrives as a Request.
"""

from incrementer.http.pipeline import Gate, Result
from incrementer.http.protocol import FastPath, Handler, HttpConnection
from incrementer.http.request import Request
from incrementer.http.server import HttpServer, Limits

__all__ = [
    "FastPath",
    "Gate",
    "Handler",
    "HttpConnection",
    "HttpServer",
    "Limits",
    "Request",
    "Result",
]
