//! What the front ends (REST in `api/`, gRPC in `grpc/`) read from the store and the
//! credential changes they make, as methods of the service: handlers never touch the
//! store themselves (a test in `api/` checks their sources).
//!
//! Each method is one store call (or one security call that writes the store), with
//! the store's error turned into the API's; none keeps state of its own.

use crate::error::ApiError;
use crate::feed::FeedRow;
use crate::security::{Budget, Scope};
use crate::store::{DeadLetter, MeasurementRow, RequestRow, ResultFilter, ResultRow};
use crate::store::{TokenUsage, Transition};

use super::Backend;

/// A request and, once it has one, its first result.
pub type RequestAndResult = (RequestRow, Option<ResultRow>);

impl Backend {
    /// The agent's connection sessions ending after `from_ms` (and an open one), oldest
    /// first: (connected, disconnected or None while open).
    pub async fn sessions_of(
        &self,
        agent: &str,
        from_ms: i64,
    ) -> Result<Vec<(i64, Option<i64>)>, ApiError> {
        Ok(self.store.sessions(agent, from_ms).await?)
    }

    /// When the agent first connected, if it ever did.
    pub async fn first_connected(&self, agent: &str) -> Result<Option<i64>, ApiError> {
        Ok(self.store.first_connected(agent).await?)
    }

    /// Records stored of the agent.
    pub async fn agent_record_count(&self, agent: &str) -> Result<u64, ApiError> {
        Ok(self.store.agent_record_count(agent).await?)
    }

    /// The agent's events, newest first: (agent time, kind, message).
    pub async fn events_of(
        &self,
        agent: &str,
        limit: u32,
    ) -> Result<Vec<(i64, String, String)>, ApiError> {
        Ok(self.store.events(agent, limit).await?)
    }

    /// Records stored, of every agent.
    pub async fn record_count(&self) -> Result<u64, ApiError> {
        Ok(self.store.record_count().await?)
    }

    /// The store's size and oldest result, read now.
    pub async fn read_store_stats(&self) -> Result<crate::store::StoreStats, ApiError> {
        Ok(self.store.store_stats().await?)
    }

    /// Hourly rollups (see [`crate::rollup`]).
    pub async fn rollups(
        &self,
        f: crate::store::RollupFilter,
    ) -> Result<Vec<crate::store::RollupRow>, ApiError> {
        Ok(self.store.rollups(f).await?)
    }

    /// Records the store could not take, over its life.
    pub async fn dead_letter_count(&self) -> Result<u64, ApiError> {
        Ok(self.store.dead_letter_count().await?)
    }

    /// Records the store could not take, newest first (of one agent, or all).
    pub async fn dead_letters(
        &self,
        agent: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, ApiError> {
        Ok(self.store.dead_letters(agent, limit).await?)
    }

    pub async fn request(&self, id: &str) -> Result<Option<RequestRow>, ApiError> {
        Ok(self.store.request(id).await?)
    }

    /// A request and its first result, in one read (what `?wait` answers with).
    pub async fn request_and_result(&self, id: &str) -> Result<Option<RequestAndResult>, ApiError> {
        Ok(self.store.request_and_result(id).await?)
    }

    /// The request's state changes, oldest first.
    pub async fn transitions_of(&self, id: &str) -> Result<Vec<Transition>, ApiError> {
        Ok(self.store.transitions(id).await?)
    }

    /// The agent's latest results, at most `limit`.
    pub async fn results_of(&self, agent: &str, limit: u32) -> Result<Vec<ResultRow>, ApiError> {
        Ok(self.store.results(agent, limit).await?)
    }

    /// The agent's result of one request, if stored.
    pub async fn result_of(
        &self,
        agent: &str,
        request_id: &str,
    ) -> Result<Option<ResultRow>, ApiError> {
        Ok(self.store.result(agent, request_id).await?)
    }

    /// A page of results in the order they were stored, each with its position.
    pub async fn results_page(&self, filter: ResultFilter) -> Result<Vec<FeedRow>, ApiError> {
        Ok(self.store.results_page(filter).await?)
    }

    /// The position of the last result stored (where a stream from now starts).
    pub async fn latest_position(&self) -> Result<i64, ApiError> {
        Ok(self.store.latest_position().await?)
    }

    pub async fn measurement(&self, id: &str) -> Result<Option<MeasurementRow>, ApiError> {
        Ok(self.store.measurement(id).await?)
    }

    /// The token's spend on the UTC day of `now_ms`, and its running schedules.
    pub async fn token_usage(&self, token: &str, now_ms: i64) -> Result<TokenUsage, ApiError> {
        Ok(self
            .store
            .token_usage(token, crate::budget::day_of(now_ms), now_ms)
            .await?)
    }

    /// Enrolls an agent; returns its token. The caller shares the credential
    /// ([`Self::share_credential`]).
    pub async fn enroll_agent(&self, id: &str, tags: Vec<String>) -> Result<String, ApiError> {
        self.security.enroll(self.store.as_ref(), id, tags).await
    }

    /// A new token for an enrolled agent.
    pub async fn rotate_agent(&self, id: &str) -> Result<String, ApiError> {
        self.security.rotate_agent(self.store.as_ref(), id).await
    }

    pub async fn revoke_agent(&self, id: &str) -> Result<(), ApiError> {
        self.security.revoke_agent(self.store.as_ref(), id).await
    }

    /// A new API token: (its id, its secret).
    pub async fn create_token(
        &self,
        id: Option<String>,
        scopes: Vec<Scope>,
        rate_per_min: Option<f64>,
        budget: Option<Budget>,
    ) -> Result<(String, String), ApiError> {
        self.security
            .create_token(self.store.as_ref(), id, scopes, rate_per_min, budget)
            .await
    }

    /// A new secret for an API token.
    pub async fn rotate_token(&self, id: &str) -> Result<String, ApiError> {
        self.security.rotate_token(self.store.as_ref(), id).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), ApiError> {
        self.security.revoke_token(self.store.as_ref(), id).await
    }
}
