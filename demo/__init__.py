"""Parts of the S3 stream-parsing demo.

A job stream-parses a large JSON document stored in S3 with HTTP range reads
and checkpoints between ranges. These modules generate the document and its
expected aggregate (`dataset`), serve it over the S3 protocol on loopback with
a server-side ledger of fetched ranges (`s3server`), and run the job
(`parse_job`, executed as a script).
"""
