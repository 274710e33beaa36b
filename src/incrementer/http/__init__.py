"""A small HTTP/1.1 server on uvloop + httptools: no framework, no business logic."""
