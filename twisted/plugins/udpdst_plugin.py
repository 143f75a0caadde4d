from twisted.application.service import ServiceMaker

udpdst = ServiceMaker(
    "udpdst",
    "udpdst.echo.tap",
    "A UDP echo service that replies from the address each datagram was sent to",
    "udpdst",
)
