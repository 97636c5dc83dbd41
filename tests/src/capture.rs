//! Packet capture with tcpdump inside a namespace, read back as raw frames.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::Netns;

pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Start capturing on `iface` in `ns` with a BPF `filter`; returns once tcpdump listens.
    pub fn start(ns: &Netns, iface: &str, filter: &str, file: PathBuf) -> Result<Self> {
        let mut child = ns
            .command("tcpdump")
            .args(["-i", iface, "-n", "-U", "--immediate-mode", "-s", "256", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (apt package tcpdump; cargo xtask setup installs it)")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(15)).is_err() {
            let _ = child.kill();
            bail!("tcpdump did not start listening on {iface}");
        }
        Ok(Self { child, file })
    }

    /// Wait (bounded: 10 s) until the frames captured so far satisfy `enough` (tcpdump
    /// writes each packet as it comes, `-U`), then stop (SIGINT to our tcpdump, by pid) and
    /// return every frame captured.
    pub fn finish_when(mut self, enough: impl Fn(&[Vec<u8>]) -> bool) -> Result<Vec<Vec<u8>>> {
        crate::wait_until(Duration::from_secs(10), || {
            std::fs::read(&self.file).ok().and_then(|d| parse_pcap(&d).ok()).is_some_and(|f| enough(&f))
        });
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let data = std::fs::read(&self.file)?;
        parse_pcap(&data)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The frames of a classic pcap file (either byte order, micro- or nanosecond).
pub fn parse_pcap(data: &[u8]) -> Result<Vec<Vec<u8>>> {
    if data.len() < 24 {
        bail!("pcap file too short ({} bytes)", data.len());
    }
    let magic = u32::from_le_bytes(data[0..4].try_into()?);
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => bail!("not a pcap file (magic {m:#x})"),
    };
    let rd = |b: &[u8]| {
        let a: [u8; 4] = b.try_into().expect("4 bytes");
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = rd(&data[off + 8..off + 12]) as usize;
        off += 16;
        if off + incl > data.len() {
            break;
        }
        frames.push(data[off..off + incl].to_vec());
        off += incl;
    }
    Ok(frames)
}
