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

The same TransactWriteItems deep-copies every table it touches before it
starts (its rollback copy), so each transaction costs time in proportion to
the table: the job-tracker's table grows with its history, and in the
10-minute fault matrix moto spent all of one core on those copies, until
the job-tracker's calls timed out and every lease lapsed. With requests
serialized, an undo log of the items the transaction names (and of the
table's stream) restores the same state, so the launcher keeps that log
instead of the copies.

A Query on a table's key (not an index) reads only its partition on AWS;
moto sorts every item of the table and compares each to the partition key,
so one Query costs time in proportion to the table (124 ms for a 5-item
partition of a 3,600-item table): after the 10-minute fault matrix the
job-tracker's ListTransitions of a job with 380 runs (a Query per run)
took longer than its 30 s request timeout. The launcher hands moto's Query
the partition's items alone, which selects and sorts the same results.
"""

import copy
import functools
import sys
import threading

import moto.dynamodb.models as _models
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
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


class _CopyButTables:
    """`copy` for moto's DynamoDB backend module, where a Table is not copied
    (only TransactWriteItems copies whole tables, for its rollback)."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(value, memo=None):
        if isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)


def _undo_log(backend, transact_items):
    """What the transaction's items and streams are now: (table, hash, range,
    a copy of the item or None) per named item, and each stream's length."""
    items, streams = [], []
    for entry in transact_items:
        _, op = next(iter(entry.items()))
        table = backend.tables.get(op.get("TableName"))
        if table is None:
            continue
        attrs = op.get("Key") or op.get("Item") or {}
        if table.hash_key_attr not in attrs:
            continue
        hash_value = DynamoType(attrs[table.hash_key_attr])
        range_value = None
        if table.range_key_attr and table.range_key_attr in attrs:
            range_value = DynamoType(attrs[table.range_key_attr])
        current = table.get_item(hash_value, range_value)
        items.append((table, hash_value, range_value, copy.deepcopy(current)))
        shard = table.stream_shard
        if shard is not None and all(s is not shard for s, _ in streams):
            streams.append((shard, len(shard.items)))
    return items, streams


def _undo(items, streams):
    for table, hash_value, range_value, item in reversed(items):
        if range_value is None:
            if item is None:
                table.items.pop(hash_value, None)
            else:
                table.items[hash_value] = item
        elif item is None:
            if hash_value in table.items:
                table.items[hash_value].pop(range_value, None)
        else:
            table.items[hash_value][range_value] = item
    for shard, length in streams:
        del shard.items[length:]


_transact_write_items = DynamoDBBackend.transact_write_items


def _transact_with_undo_log(self, transact_items):
    items, streams = _undo_log(self, transact_items)
    try:
        return _transact_write_items(self, transact_items)
    except Exception:
        _undo(items, streams)
        raise


_table_query = Table.query


def _query_the_partition(self, hash_key, *args, **kwargs):
    """Table.query with `all_items` narrowed to the partition `hash_key`
    when the query is on the table's own key (requests are serialized, so
    the instance attribute is seen by this call only)."""
    index_name = args[6] if len(args) > 6 else kwargs.get("index_name")
    if index_name or hash_key is None:
        return _table_query(self, hash_key, *args, **kwargs)
    partition = self.items.get(hash_key)
    if partition is None:
        items = []
    elif self.range_key_attr:
        items = list(partition.values())
    else:
        items = [partition]
    self.all_items = lambda: items
    try:
        return _table_query(self, hash_key, *args, **kwargs)
    finally:
        del self.all_items


_models.copy = _CopyButTables()
Table.query = _query_the_partition
DynamoDBBackend.transact_write_items = _transact_with_undo_log

for _name in _METHODS:
    setattr(DynamoDBBackend, _name, _serialized(getattr(DynamoDBBackend, _name)))

if __name__ == "__main__":
    sys.exit(main())
