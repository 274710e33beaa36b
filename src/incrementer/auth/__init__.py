"""API keys and rate limits: `keyring` checks a request's key and holds the token buckets,
`source` keeps the keyring in step with the database, `admin` is what `incrementer keys` does.
Nothing is imported here on purpose."""
