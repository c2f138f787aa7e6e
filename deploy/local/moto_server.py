"""moto's server with its DynamoDB requests applied one at a time.

moto (5.x) serves requests on threads, and its TransactWriteItems rolls a
failed transaction back by restoring a copy of every table it touched, taken
when the transaction started: a write that another request committed in
between is silently undone. Two concurrent UpdateItem ADDs beside failing
transactions lose increments (300 ADDs left 264 here), and the job-tracker's
store lost unit-count updates under the fault matrix. AWS DynamoDB isolates
transactions; this launcher gives the stand-in the same guarantee by holding
one lock around every DynamoDB read and write, then runs moto's own server
(same arguments as `moto_server`). Test setup only: nothing in the product
knows about it.
"""

import functools
import sys
import threading

from moto.dynamodb.models import DynamoDBBackend
from moto.server import main

_LOCK = threading.RLock()

_METHODS = (
    "put_item",
    "update_item",
    "delete_item",
    "get_item",
    "query",
    "scan",
    "transact_write_items",
)


def _serialized(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with _LOCK:
            return method(*args, **kwargs)

    return wrapper


for _name in _METHODS:
    setattr(DynamoDBBackend, _name, _serialized(getattr(DynamoDBBackend, _name)))

if __name__ == "__main__":
    sys.exit(main())
