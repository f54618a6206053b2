//! Throwaway prototype: blocking per-connection threads, modes for qd1 placement.
use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use cairn_nbd::handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeStep};
use cairn_nbd::wire::{self, REQUEST_HEADER_LEN, Request};

struct One(ExportInfo);
impl ExportCatalog for One {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == self.0.name).then(|| self.0.clone())
    }
    fn list(&self) -> Vec<ExportInfo> {
        vec![self.0.clone()]
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = std::sync::Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&args[1])
            .unwrap(),
    );
    let size = file.metadata().unwrap().len();
    let info = ExportInfo {
        name: args[3].clone(),
        description: String::new(),
        size,
        read_only: false,
        multi_conn: true,
    };
    let l = TcpListener::bind(&args[2]).unwrap();
    let mode = std::env::var("MODE").unwrap_or_default();
    for s in l.incoming() {
        let s = s.unwrap();
        s.set_nodelay(true).unwrap();
        let (file, info, mode) = (file.clone(), info.clone(), mode.clone());
        std::thread::spawn(move || serve(s, &file, info, &mode));
    }
}

fn serve(mut s: TcpStream, file: &std::fs::File, info: ExportInfo, mode: &str) {
    let cat = One(info);
    let mut hs = Handshake::new();
    s.write_all(&hs.take_output()).unwrap();
    let mut buf: Vec<u8> = Vec::new();
    let neg = loop {
        let (used, step) = match hs.step(&buf, &cat) {
            Ok(x) => x,
            Err(_) => return,
        };
        buf.drain(..used);
        let out = hs.take_output();
        if !out.is_empty() {
            s.write_all(&out).unwrap();
        }
        match step {
            HandshakeStep::Continue => {}
            HandshakeStep::Done(n) => break n,
            HandshakeStep::Abort => return,
            HandshakeStep::NeedMore => {
                let mut t = [0u8; 4096];
                let n = s.read(&mut t).unwrap();
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&t[..n]);
            }
        }
    };
    let spin_us: u64 = mode
        .strip_prefix("spin:")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let follow = mode == "follow";
    let mut rbuf = vec![0u8; 256 * 1024];
    let (mut lo, mut hi) = (0usize, 0usize);
    let mut cur_cpu = usize::MAX;
    for (i, b) in buf.iter().enumerate() {
        rbuf[i] = *b;
        hi = i + 1;
    }
    loop {
        // parse
        let mut heads = Vec::new();
        let mut datas: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut n_req = 0;
        while hi - lo >= REQUEST_HEADER_LEN {
            let req = Request::parse(rbuf[lo..lo + 28].try_into().unwrap()).unwrap();
            let pl = req.payload_len();
            if hi - lo < 28 + pl {
                break;
            }
            let payload = &rbuf[lo + 28..lo + 28 + pl];
            lo += 28 + pl;
            n_req += 1;
            match req.command {
                0 => {
                    let mut d = vec![0u8; req.len as usize];
                    file.read_exact_at(&mut d, req.offset).unwrap();
                    wire::read_reply_header(
                        &mut heads,
                        neg.structured,
                        req.handle,
                        req.offset,
                        d.len(),
                    );
                    datas.push((heads.len(), d));
                }
                1 => {
                    file.write_all_at(payload, req.offset).unwrap();
                    wire::ok_reply(&mut heads, neg.structured, req.handle);
                }
                2 => return,
                _ => wire::ok_reply(&mut heads, neg.structured, req.handle),
            }
        }
        if !heads.is_empty() {
            let mut sl = Vec::new();
            let mut from = 0;
            for (e, d) in &datas {
                sl.push(IoSlice::new(&heads[from..*e]));
                sl.push(IoSlice::new(d));
                from = *e;
            }
            if from < heads.len() {
                sl.push(IoSlice::new(&heads[from..]));
            }
            let mut rest = &mut sl[..];
            while !rest.is_empty() {
                let n = s.write_vectored(rest).unwrap();
                IoSlice::advance_slices(&mut rest, n);
            }
        }
        if lo == hi {
            lo = 0;
            hi = 0;
        } else if rbuf.len() - hi < 128 * 1024 {
            rbuf.copy_within(lo..hi, 0);
            hi -= lo;
            lo = 0;
        }
        // read more
        let mut got = 0;
        if spin_us > 0 {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(spin_us) {
                match rustix::net::recv(&s, &mut rbuf[hi..], rustix::net::RecvFlags::DONTWAIT) {
                    Ok((n, _)) => {
                        got = n;
                        if n == 0 {
                            return;
                        }
                        break;
                    }
                    Err(_) => std::hint::spin_loop(),
                }
            }
        }
        if got == 0 {
            got = match s.read(&mut rbuf[hi..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
        }
        hi += got;
        if follow {
            let latency_bound = n_req <= 1;
            if latency_bound {
                if let Ok(c) = rustix::net::sockopt::socket_incoming_cpu(&s) {
                    let c = c as usize;
                    if std::env::var("DBG").is_ok() {
                        eprintln!("incoming {c} on {}", rustix::thread::sched_getcpu());
                    }
                    if c != cur_cpu {
                        let mut set = rustix::thread::CpuSet::new();
                        set.set(c);
                        let _ = rustix::thread::sched_setaffinity(None, &set);
                        cur_cpu = c;
                    }
                }
            } else if cur_cpu != usize::MAX {
                let mut set = rustix::thread::CpuSet::new();
                for i in 0..2 {
                    set.set(i);
                }
                let _ = rustix::thread::sched_setaffinity(None, &set);
                cur_cpu = usize::MAX;
            }
        }
    }
}
