//! The baseline server: every byte read is written back, nothing parsed, so the same
//! frames come back as "answers" and the generator's own cost is measured with no switch
//! in between (directly, or through a TCP proxy such as HAProxy).

use std::net::SocketAddr;

use anyhow::Result;
use tokio::net::TcpListener;

/// Serve until the process is stopped.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).await?;
    println!("echo server on {}", l.local_addr()?);
    loop {
        let (mut s, _) = l.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}
