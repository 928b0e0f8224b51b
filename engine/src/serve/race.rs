//! Waiting for the first of two futures (the daemon's tasks race their I/O against stop
//! notices and timeouts). The loser is dropped unfinished, so both must be cancel-safe.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;

/// Which of two raced futures finished first, with its output.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Either<A, B> {
    /// The first future.
    Left(A),
    /// The second future.
    Right(B),
}

/// Polls `left` then `right` on every wake; yields the first output and drops the other
/// future (when both are ready on the same wake, `left` wins).
pub(crate) async fn race<A: Future, B: Future>(left: A, right: B) -> Either<A::Output, B::Output> {
    let mut left = pin!(left);
    let mut right = pin!(right);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = left.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(out));
        }
        if let Poll::Ready(out) = right.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(out));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_side_wins_and_left_wins_a_tie() {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut both = pin!(race(async { 1 }, async { 2 }));
        assert_eq!(both.as_mut().poll(&mut cx), Poll::Ready(Either::Left(1)));
        let mut right = pin!(race(std::future::pending::<u8>(), async { 2 }));
        assert_eq!(right.as_mut().poll(&mut cx), Poll::Ready(Either::Right(2)));
    }
}
