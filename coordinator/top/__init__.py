"""`python -m coordinator top`: a live terminal view of a running server, read from its
/metrics. snapshot.py fetches and parses one scrape; view.py draws frames with rich."""
