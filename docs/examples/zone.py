# A zone in Twisted's --pyzone format: SOA and A are given by Twisted's
# authority loader, so this file is read by it, not imported.
zone = [
    SOA(
        "example.com",
        mname="ns1.example.com",
        rname="root.example.com",
        serial=1,
        refresh=3600,
        retry=600,
        expire=86400,
        minimum=300,
    ),
    A("example.com", "192.0.2.1"),
]
