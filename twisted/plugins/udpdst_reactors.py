from udpdst.reactors import DestinationReactor

udpdst = DestinationReactor("udpdst", "epoll")
udpdstAsyncio = DestinationReactor("udpdst-asyncio", "asyncio")
udpdstPoll = DestinationReactor("udpdst-poll", "poll")
udpdstSelect = DestinationReactor("udpdst-select", "select")
