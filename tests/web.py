"""The tests' own HTTP requests to the servers they start, through one client.

`httpx.get()` and its kin make a client per call, and with it an SSL context that loads
the system's whole CA bundle (35 ms of CPU), even for an http:// URL: some tests make
hundreds. This client trusts the system's CAs loaded once (what `verify=True` trusts),
and keeps what each call of its own would not: no connection alive between requests (the
servers come and go between tests), no cookie (a console session must not follow a test
into requests it makes as nobody).
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from strata.transport import system_trust

client = httpx.Client(verify=system_trust(), limits=httpx.Limits(max_keepalive_connections=0),
                      cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])))
get = client.get
post = client.post
request = client.request
