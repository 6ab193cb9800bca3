"""Splits each stream's way through a proxy at the proxy's system calls (see
bench/open-timeline.sh): reads `perf script -F pid,tid,time,event,trace` output on stdin,
prints the median, 90th percentile and mean of each step in microseconds.

A stream is followed by its client descriptor: accepted; its request head read (the
first read that returns bytes); the connect to the origin that the same thread starts
next; the first write on that origin connection that sends bytes; the first read on it
that returns bytes; and the first write on the client descriptor after that.
"""

import re
import sys

LINE = re.compile(r"^\s*(\d+)/(\d+)\s+([\d.]+):\s+syscalls:(\S+):\s*(.*)$")
FD = re.compile(r"fd: 0x([0-9a-f]+)")
EMPTY_SEND = re.compile(r"\blen: 0x0+\b")
STEPS = ["accept > request", "request > connect", "connect > send", "send > answer", "answer > first"]


class Process:
    def __init__(self):
        self.accepted = {}  # client fd -> time
        self.request = {}  # client fd -> time its request head was read
        self.origin = {}  # origin fd -> [client fd, connect, send, answer]
        self.reading = {}  # tid -> fd of the read in progress
        self.pending = {}  # tid -> client fd whose request it read last


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "proxy"
    procs = {}
    steps = {s: [] for s in STEPS}
    totals = []
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        pid, tid, t, event, args = m.groups()
        p = procs.setdefault(pid, Process())
        t = float(t) * 1e6
        fd = FD.search(args)
        fd = int(fd.group(1), 16) if fd else None
        if event == "sys_exit_accept4":
            ret = int(args.strip(), 16)
            if ret < 1 << 31:
                p.accepted[ret] = t
                p.request.pop(ret, None)
        elif event in ("sys_enter_recvfrom", "sys_enter_read"):
            p.reading[tid] = fd
        elif event in ("sys_exit_recvfrom", "sys_exit_read"):
            ret = int(args.strip(), 16)
            fd = p.reading.pop(tid, None)
            if fd is None or ret == 0 or ret >= 1 << 63:
                continue
            if fd in p.accepted and fd not in p.request:
                p.request[fd] = t
                p.pending[tid] = fd
            elif fd in p.origin and p.origin[fd][2] is not None and p.origin[fd][3] is None:
                p.origin[fd][3] = t
        elif event == "sys_enter_connect":
            client = p.pending.pop(tid, None)
            if client is not None:
                p.origin[fd] = [client, t, None, None]
        elif event in ("sys_enter_sendto", "sys_enter_writev", "sys_enter_write"):
            if EMPTY_SEND.search(args):
                # A send of nothing (streamgate's check that a connect is made) sends
                # no request.
                continue
            if fd in p.origin:
                if p.origin[fd][2] is None:
                    p.origin[fd][2] = t
                continue
            if fd not in p.accepted or fd not in p.request:
                continue
            for ofd, (client, connect, send, answer) in list(p.origin.items()):
                if client != fd or answer is None:
                    continue
                accepted, request = p.accepted.pop(fd), p.request.pop(fd)
                for step, d in zip(STEPS, (request - accepted, connect - request, send - connect,
                                           answer - send, t - answer)):
                    steps[step].append(d)
                totals.append(t - accepted)
                del p.origin[ofd]
                break
    if not totals:
        print(f"{name}: no stream followed")
        return
    print(f"{name}: {len(totals)} streams followed, microseconds")
    print(f"  {'step':<18} {'median':>7} {'p90':>7} {'mean':>7}")
    for step, values in list(steps.items()) + [("accept > first", totals)]:
        values.sort()
        mid, p90 = values[len(values) // 2], values[int(len(values) * 0.9)]
        print(f"  {step:<18} {mid:7.0f} {p90:7.0f} {sum(values) / len(values):7.0f}")


main()
