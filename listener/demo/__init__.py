"""`token-reset demo`: a month rollover on an embedded PostgreSQL, watched by the real service.

A consumer of the package, not a part of its core: `run` tells the story, `scrape`
reads the service's /metrics into a time series, `story` plans the users and words
the summary.
"""
