//! Read-after-write: the account's own fresh records spliced into AppView
//! responses the AppView has not caught up with.
//!
//! The AppView learns of a write from the firehose, a moment (or, when it
//! lags, minutes) after the PDS committed it. Its responses carry the
//! `atproto-repo-rev` it has indexed for the requester; when that is older
//! than the repository's rev, the proxy (`xrpc::forward`) loads the records
//! written since and hands them here, so a new post, reply, like or profile
//! edit shows at once. The reference PDS does the same for the same methods.
//!
//! Everything here is a pure transformation of the response JSON: no I/O, no
//! clock. The shape of views follows the `app.bsky` lexicons; what cannot be
//! built from the repository alone (posts the account quotes or likes) comes
//! in as views the caller fetched from the AppView (`app.bsky.feed.getPosts`).
//! A body whose shape is not the one expected is left alone
//! ([`UnexpectedShape`]): an AppView answer is never made worse.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};

use crate::atp::syntax::{Datetime, Tid};

/// How many fresh records one response may take in. The reference PDS stops
/// at 10 of any kind; likes count here too, so a little more room.
pub const MAX_LOCAL_RECORDS: i64 = 25;
/// `app.bsky.feed.getPosts` takes at most 25 URIs.
pub const MAX_FETCHED_POSTS: usize = 25;

const POST: &str = "app.bsky.feed.post";
const LIKE: &str = "app.bsky.feed.like";
const PROFILE: &str = "app.bsky.actor.profile";
const THREAD_VIEW_POST: &str = "app.bsky.feed.defs#threadViewPost";
const REASON_PIN: &str = "app.bsky.feed.defs#reasonPin";

/// The methods whose responses are patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Timeline,
    AuthorFeed,
    PostThread,
    Profile,
    Profiles,
    ActorLikes,
}

impl Method {
    pub fn from_nsid(nsid: &str) -> Option<Method> {
        Some(match nsid {
            "app.bsky.feed.getTimeline" => Method::Timeline,
            "app.bsky.feed.getAuthorFeed" => Method::AuthorFeed,
            "app.bsky.feed.getPostThread" => Method::PostThread,
            "app.bsky.actor.getProfile" => Method::Profile,
            "app.bsky.actor.getProfiles" => Method::Profiles,
            "app.bsky.feed.getActorLikes" => Method::ActorLikes,
            _ => return None,
        })
    }
}

/// The body did not have the shape the method's lexicon gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected response shape: {0}")]
pub struct UnexpectedShape(&'static str);

/// One record written after the AppView's rev.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRecord {
    pub uri: String,
    pub cid: String,
    /// When it was written: the timestamp of its commit's rev (a TID).
    pub indexed_at: String,
    indexed_at_micros: u64,
    pub value: Value,
}

/// The fresh records, by kind, each list oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalRecords {
    pub profile: Option<LocalRecord>,
    pub posts: Vec<LocalRecord>,
    pub likes: Vec<LocalRecord>,
}

impl LocalRecords {
    /// Files a record written in commit `rev`; records are pushed oldest
    /// first. Other collections, other profile keys and revs that are not
    /// TIDs (never written by Roost) are ignored.
    pub fn push(&mut self, did: &str, collection: &str, rkey: &str, cid: String, rev: &str, value: Value) {
        let Ok(tid) = Tid::new(rev) else { return };
        let micros = tid.timestamp_micros();
        let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let record = LocalRecord {
            uri: format!("at://{did}/{collection}/{rkey}"),
            cid,
            indexed_at: Datetime::from_offset(at).as_str().to_owned(),
            indexed_at_micros: micros,
            value,
        };
        match collection {
            POST => self.posts.push(record),
            LIKE => self.likes.push(record),
            PROFILE if rkey == "self" => self.profile = Some(record),
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.profile.is_none() && self.posts.is_empty() && self.likes.is_empty()
    }

    /// Milliseconds the AppView is behind: the age of the oldest write it has
    /// not indexed (the reference PDS's `Atproto-Upstream-Lag`).
    pub fn lag_ms(&self, now_micros: u64) -> Option<u64> {
        let oldest =
            self.profile.iter().chain(&self.posts).chain(&self.likes).map(|r| r.indexed_at_micros).min()?;
        Some(now_micros.saturating_sub(oldest) / 1000)
    }

    fn post(&self, uri: &str) -> Option<&LocalRecord> {
        self.posts.iter().find(|p| p.uri == uri)
    }

    /// The newest fresh like of `uri`, if any.
    fn like_of(&self, uri: &str) -> Option<&LocalRecord> {
        self.likes.iter().rev().find(|l| str_at(&l.value, &["subject", "uri"]) == Some(uri))
    }
}

/// What the local views are made of: the account and its current profile.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub did: String,
    pub handle: String,
    /// This PDS's URL: blobs are linked through its `getBlob`, as the
    /// reference PDS does when no CDN is configured.
    pub public_url: String,
    /// The account's current `app.bsky.actor.profile/self`, if any.
    pub profile: Option<Value>,
}

impl Viewer {
    fn blob_url(&self, blob: &Value) -> Option<String> {
        // Blob refs are `{"$type":"blob","ref":{"$link":cid}}`; legacy ones `{"cid":cid}`.
        let cid = str_at(blob, &["ref", "$link"]).or_else(|| str_at(blob, &["cid"]))?;
        Some(format!("{}/xrpc/com.atproto.sync.getBlob?did={}&cid={cid}", self.public_url, self.did))
    }

    /// `app.bsky.actor.defs#profileViewBasic` of the account.
    fn profile_basic(&self) -> Value {
        let mut view = json!({ "did": self.did, "handle": self.handle });
        if let (Some(record), Some(view)) = (&self.profile, view.as_object_mut()) {
            self.overlay_basic(view, record);
        }
        view
    }

    /// A profile record over a basic view: the fields it names, and none it
    /// dropped (an emptied display name must disappear too).
    fn overlay_basic(&self, view: &mut Map<String, Value>, record: &Value) {
        set_or_remove(view, "displayName", record.get("displayName").cloned());
        set_or_remove(view, "avatar", record.get("avatar").and_then(|b| self.blob_url(b)).map(Value::from));
    }

    /// … over a `profileViewDetailed`.
    fn overlay_detailed(&self, view: &mut Map<String, Value>, record: &Value) {
        self.overlay_basic(view, record);
        set_or_remove(view, "description", record.get("description").cloned());
        set_or_remove(view, "banner", record.get("banner").and_then(|b| self.blob_url(b)).map(Value::from));
    }

    /// `app.bsky.feed.defs#postView` of a fresh post: nobody can have replied,
    /// reposted, liked or quoted it yet, so the counts are zero.
    fn post_view(&self, post: &LocalRecord, local: &LocalRecords, fetched: &HashMap<String, Value>) -> Value {
        let mut view = json!({
            "uri": post.uri,
            "cid": post.cid,
            "author": self.profile_basic(),
            "record": post.value,
            "replyCount": 0,
            "repostCount": 0,
            "likeCount": 0,
            "quoteCount": 0,
            "indexedAt": post.indexed_at,
        });
        if let Some(embed) = post.value.get("embed").and_then(|e| self.embed_view(e, local, fetched)) {
            view["embed"] = embed;
        }
        view
    }

    fn embed_view(
        &self,
        embed: &Value,
        local: &LocalRecords,
        fetched: &HashMap<String, Value>,
    ) -> Option<Value> {
        match str_at(embed, &["$type"])? {
            "app.bsky.embed.images" | "app.bsky.embed.external" => self.media_view(embed),
            "app.bsky.embed.record" => Some(self.record_embed_view(embed.get("record")?, local, fetched)),
            "app.bsky.embed.recordWithMedia" => Some(json!({
                "$type": "app.bsky.embed.recordWithMedia#view",
                "record": self.record_embed_view(embed.get("record")?.get("record")?, local, fetched),
                "media": self.media_view(embed.get("media")?)?,
            })),
            // Videos play from the AppView's video service, which has no
            // playlist for an unindexed post yet: no view rather than a broken one.
            _ => None,
        }
    }

    fn media_view(&self, media: &Value) -> Option<Value> {
        match str_at(media, &["$type"])? {
            "app.bsky.embed.images" => {
                let images: Vec<Value> = media
                    .get("images")?
                    .as_array()?
                    .iter()
                    .filter_map(|img| {
                        let url = self.blob_url(img.get("image")?)?;
                        let mut view = json!({
                            "thumb": url,
                            "fullsize": url,
                            "alt": img.get("alt").cloned().unwrap_or_else(|| Value::from("")),
                        });
                        if let Some(ratio) = img.get("aspectRatio") {
                            view["aspectRatio"] = ratio.clone();
                        }
                        Some(view)
                    })
                    .collect();
                Some(json!({ "$type": "app.bsky.embed.images#view", "images": images }))
            }
            "app.bsky.embed.external" => {
                let external = media.get("external")?;
                let mut view = json!({
                    "uri": external.get("uri")?,
                    "title": external.get("title").cloned().unwrap_or_else(|| Value::from("")),
                    "description": external.get("description").cloned().unwrap_or_else(|| Value::from("")),
                });
                if let Some(thumb) = external.get("thumb").and_then(|t| self.blob_url(t)) {
                    view["thumb"] = Value::from(thumb);
                }
                Some(json!({ "$type": "app.bsky.embed.external#view", "external": view }))
            }
            _ => None,
        }
    }

    /// `app.bsky.embed.record#view` of a strong ref: the quoted post as the
    /// AppView showed it, or as built here when it is fresh too.
    fn record_embed_view(
        &self,
        strong_ref: &Value,
        local: &LocalRecords,
        fetched: &HashMap<String, Value>,
    ) -> Value {
        let uri = str_at(strong_ref, &["uri"]).unwrap_or_default();
        let post = match local.post(uri) {
            // No `fetched` below: a quote of a quote is shown without its
            // inner embed, and the recursion stays one level deep.
            Some(fresh) => Some(self.post_view(fresh, &LocalRecords::default(), &HashMap::new())),
            None => fetched.get(uri).cloned(),
        };
        let record = match post {
            Some(post) => {
                let mut view = json!({
                    "$type": "app.bsky.embed.record#viewRecord",
                    "uri": post.get("uri"),
                    "cid": post.get("cid"),
                    "author": post.get("author"),
                    "value": post.get("record"),
                    "indexedAt": post.get("indexedAt"),
                });
                for field in ["labels", "likeCount", "replyCount", "repostCount", "quoteCount"] {
                    if let Some(v) = post.get(field) {
                        view[field] = v.clone();
                    }
                }
                if let Some(embed) = post.get("embed") {
                    view["embeds"] = json!([embed]);
                }
                view
            }
            None => json!({ "$type": "app.bsky.embed.record#viewNotFound", "uri": uri, "notFound": true }),
        };
        json!({ "$type": "app.bsky.embed.record#view", "record": record })
    }
}

/// One request's view of things: who asks, what is fresh, and the query.
pub struct Context<'a> {
    pub viewer: &'a Viewer,
    pub local: &'a LocalRecords,
    /// The request's query parameters, in order.
    pub params: &'a [(String, String)],
}

impl Context<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn is_requester(&self, actor: &str) -> bool {
        actor == self.viewer.did || actor.eq_ignore_ascii_case(&self.viewer.handle)
    }

    fn actor_is_requester(&self) -> bool {
        self.param("actor").is_some_and(|a| self.is_requester(a))
    }

    /// Post URIs whose views must come from the AppView for this method:
    /// posts the fresh posts quote, or (in the likes feed) the liked posts.
    pub fn posts_to_fetch(&self, method: Method) -> Vec<String> {
        let candidates: Vec<&str> = match method {
            Method::Timeline | Method::AuthorFeed | Method::PostThread => self
                .local
                .posts
                .iter()
                .filter_map(|p| {
                    let embed = p.value.get("embed")?;
                    match str_at(embed, &["$type"])? {
                        "app.bsky.embed.record" => str_at(embed, &["record", "uri"]),
                        "app.bsky.embed.recordWithMedia" => str_at(embed, &["record", "record", "uri"]),
                        _ => None,
                    }
                })
                .collect(),
            Method::ActorLikes if self.actor_is_requester() => {
                self.local.likes.iter().filter_map(|l| str_at(&l.value, &["subject", "uri"])).collect()
            }
            _ => Vec::new(),
        };
        let mut seen = HashSet::new();
        candidates
            .into_iter()
            .filter(|uri| uri.starts_with("at://") && uri.contains(&format!("/{POST}/")))
            .filter(|uri| self.local.post(uri).is_none() && seen.insert(*uri))
            .take(MAX_FETCHED_POSTS)
            .map(str::to_owned)
            .collect()
    }

    /// Patches `body`, the AppView's answer to `method`, with the fresh
    /// records. `fetched` holds the post views named by [`Self::posts_to_fetch`]
    /// that the AppView returned.
    ///
    /// # Errors
    /// The body does not have the method's shape; it is then left as it was
    /// or partly patched, and the caller must send the original.
    pub fn apply(
        &self,
        method: Method,
        body: &mut Value,
        fetched: &HashMap<String, Value>,
    ) -> Result<(), UnexpectedShape> {
        match method {
            Method::Timeline => {
                let feed = feed_of(body)?;
                self.overlay_authors(feed);
                self.insert_posts(feed, |_| true, fetched);
                self.mark_feed_likes(feed);
            }
            Method::AuthorFeed => {
                let feed = feed_of(body)?;
                // Only the requester's own feed gains their posts (the
                // reference PDS guesses the owner from the first item; the
                // `actor` parameter says it even for an empty feed).
                if self.actor_is_requester() {
                    self.overlay_authors(feed);
                    let filter = self.param("filter").unwrap_or("posts_with_replies");
                    self.insert_posts(feed, |post| self.matches_author_filter(filter, post), fetched);
                }
                self.mark_feed_likes(feed);
            }
            Method::PostThread => self.post_thread(body, fetched)?,
            Method::Profile => {
                let view = body.as_object_mut().ok_or(UnexpectedShape("profile is not an object"))?;
                if view.get("did").and_then(Value::as_str) == Some(&self.viewer.did)
                    && let Some(profile) = &self.local.profile
                {
                    self.viewer.overlay_detailed(view, &profile.value);
                }
            }
            Method::Profiles => {
                let profiles = body
                    .get_mut("profiles")
                    .and_then(Value::as_array_mut)
                    .ok_or(UnexpectedShape("profiles is not an array"))?;
                if let Some(profile) = &self.local.profile {
                    for view in profiles.iter_mut().filter_map(Value::as_object_mut) {
                        if view.get("did").and_then(Value::as_str) == Some(&self.viewer.did) {
                            self.viewer.overlay_detailed(view, &profile.value);
                        }
                    }
                }
            }
            Method::ActorLikes => {
                let feed = feed_of(body)?;
                self.overlay_authors(feed);
                if self.actor_is_requester() && self.param("cursor").is_none_or(str::is_empty) {
                    self.insert_likes(feed, fetched);
                }
                self.mark_feed_likes(feed);
            }
        }
        Ok(())
    }

    /// The fresh profile over the requester's author views in a feed.
    fn overlay_authors(&self, feed: &mut [Value]) {
        let Some(profile) = &self.local.profile else { return };
        for item in feed {
            if let Some(author) = item.pointer_mut("/post/author").and_then(Value::as_object_mut)
                && author.get("did").and_then(Value::as_str) == Some(&self.viewer.did)
            {
                self.viewer.overlay_basic(author, &profile.value);
            }
        }
    }

    /// Fresh posts into a feed page, by `indexedAt` like the feed itself.
    ///
    /// A post goes where its time falls within the page: after the page's
    /// last item, and on a later page (a `cursor` was given) not after its
    /// first, so it is not repeated atop every page (the reference PDS puts
    /// it on every page newer than its last item). Pinned items keep their place.
    fn insert_posts(
        &self,
        feed: &mut Vec<Value>,
        keep: impl Fn(&LocalRecord) -> bool,
        fetched: &HashMap<String, Value>,
    ) {
        let indexed_at = |item: &Value| -> Option<String> {
            if str_at(item, &["reason", "$type"]) == Some(REASON_PIN) {
                return None;
            }
            str_at(item, &["post", "indexedAt"]).map(str::to_owned)
        };
        let times: Vec<String> = feed.iter().filter_map(indexed_at).collect();
        let later_page = self.param("cursor").is_some_and(|c| !c.is_empty());
        if later_page && times.is_empty() {
            return; // past the end of the feed
        }
        let lower = times.last().cloned().unwrap_or_default();
        let upper = if later_page { times.first().cloned() } else { None };
        let present: HashSet<String> =
            feed.iter().filter_map(|i| str_at(i, &["post", "uri"]).map(str::to_owned)).collect();
        for post in self.local.posts.iter().rev() {
            if present.contains(&post.uri)
                || post.indexed_at <= lower
                || upper.as_ref().is_some_and(|u| post.indexed_at > *u)
                || !keep(post)
            {
                continue;
            }
            let view = json!({ "post": self.viewer.post_view(post, self.local, fetched) });
            let at = feed.iter().position(|item| indexed_at(item).is_some_and(|t| t < post.indexed_at));
            match at {
                Some(i) => feed.insert(i, view),
                None => feed.push(view),
            }
        }
    }

    /// The `getAuthorFeed` filters a fresh post can be judged by.
    fn matches_author_filter(&self, filter: &str, post: &LocalRecord) -> bool {
        let reply_root = str_at(&post.value, &["reply", "root", "uri"]);
        let embed_type = str_at(&post.value, &["embed", "$type"]);
        let media_type = match embed_type {
            Some("app.bsky.embed.recordWithMedia") => str_at(&post.value, &["embed", "media", "$type"]),
            other => other,
        };
        match filter {
            "posts_no_replies" => reply_root.is_none(),
            // Replies count only in threads the author started.
            "posts_and_author_threads" => {
                reply_root.is_none_or(|root| root.starts_with(&format!("at://{}/", self.viewer.did)))
            }
            "posts_with_media" => {
                matches!(media_type, Some("app.bsky.embed.images" | "app.bsky.embed.video"))
            }
            "posts_with_video" => media_type == Some("app.bsky.embed.video"),
            _ => true,
        }
    }

    /// Fresh likes atop the likes feed, newest first, for posts the AppView
    /// returned (or fresh posts of the account).
    fn insert_likes(&self, feed: &mut Vec<Value>, fetched: &HashMap<String, Value>) {
        let mut present: HashSet<String> =
            feed.iter().filter_map(|i| str_at(i, &["post", "uri"]).map(str::to_owned)).collect();
        // Oldest first, each to the top: the newest ends up first.
        for like in &self.local.likes {
            let Some(subject) = str_at(&like.value, &["subject", "uri"]) else { continue };
            if present.contains(subject) {
                continue;
            }
            let post = match self.local.post(subject) {
                Some(fresh) => self.viewer.post_view(fresh, self.local, fetched),
                None => match fetched.get(subject) {
                    Some(view) => view.clone(),
                    None => continue,
                },
            };
            present.insert(subject.to_owned());
            feed.insert(0, json!({ "post": post }));
        }
    }

    /// A post the account has just liked shows as liked, counted once more.
    fn mark_like(&self, post: &mut Value) {
        let Some(uri) = str_at(post, &["uri"]) else { return };
        let Some(like) = self.local.like_of(uri) else { return };
        let Some(post) = post.as_object_mut() else { return };
        if post.get("viewer").and_then(|v| v.get("like")).is_some() {
            return; // the AppView knows of a like already
        }
        let viewer = post.entry("viewer").or_insert_with(|| json!({}));
        if let Some(viewer) = viewer.as_object_mut() {
            viewer.insert("like".into(), Value::from(like.uri.clone()));
            let count = post.get("likeCount").and_then(Value::as_u64).unwrap_or(0);
            post.insert("likeCount".into(), Value::from(count + 1));
        }
    }

    fn mark_feed_likes(&self, feed: &mut [Value]) {
        if self.local.likes.is_empty() {
            return;
        }
        for item in feed {
            if let Some(post) = item.get_mut("post") {
                self.mark_like(post);
            }
        }
    }

    /// The answer to `getPostThread` for a fresh post of the account that the
    /// AppView does not know yet (it said `NotFound`): the post, its fresh
    /// replies, and its fresh ancestors. Also returns the first ancestor that
    /// is not fresh, whose thread (with its own parents) only the AppView can
    /// give; see [`attach_ancestors`].
    pub fn fresh_thread(
        &self,
        uri: &str,
        fetched: &HashMap<String, Value>,
    ) -> Option<(Value, Option<String>)> {
        let post = self.local.post(uri)?;
        let view = json!({
            "$type": THREAD_VIEW_POST,
            "post": self.viewer.post_view(post, self.local, fetched),
        });
        let mut body = json!({ "thread": view });
        self.post_thread(&mut body, fetched).ok()?;
        // Walk up through fresh parents; the chain ends at the first one the
        // AppView must provide. Bounded: fresh posts are few, and a cycle
        // cannot exist (a parent is older than its reply), but stay safe.
        let mut parent = str_at(&post.value, &["reply", "parent", "uri"]).map(str::to_owned);
        let mut chain = Vec::new();
        while let Some(uri) = parent.take() {
            let Some(fresh) = self.local.post(&uri).filter(|_| chain.len() < self.local.posts.len()) else {
                parent = Some(uri);
                break;
            };
            chain.push(json!({
                "$type": THREAD_VIEW_POST,
                "post": self.viewer.post_view(fresh, self.local, fetched),
            }));
            parent = str_at(&fresh.value, &["reply", "parent", "uri"]).map(str::to_owned);
        }
        // Nest the chain: the nearest parent under the thread, its parent under it…
        let mut ancestors: Option<Value> = None;
        for mut node in chain.into_iter().rev() {
            if let Some(above) = ancestors.take() {
                node["parent"] = above;
            }
            ancestors = Some(node);
        }
        if let Some(ancestors) = ancestors {
            body["thread"]["parent"] = ancestors;
        }
        self.mark_thread_likes(&mut body["thread"]);
        Some((body, parent))
    }

    /// Fresh replies into a thread, under their parent when the parent is
    /// in it, newest first like the reference PDS.
    fn post_thread(&self, body: &mut Value, fetched: &HashMap<String, Value>) -> Result<(), UnexpectedShape> {
        let thread = body.get_mut("thread").ok_or(UnexpectedShape("no thread"))?;
        if str_at(thread, &["$type"]) != Some(THREAD_VIEW_POST) {
            return Ok(()); // a notFoundPost or blockedPost: nothing to hang replies on
        }
        let anchor = str_at(thread, &["post", "uri"]).ok_or(UnexpectedShape("thread post has no uri"))?;
        let anchor = anchor.to_owned();
        let anchor_root = str_at(thread, &["post", "record", "reply", "root", "uri"]).map(str::to_owned);
        for post in &self.local.posts {
            let Some(root) = str_at(&post.value, &["reply", "root", "uri"]) else { continue };
            let Some(parent) = str_at(&post.value, &["reply", "parent", "uri"]) else { continue };
            let in_thread = root == anchor || anchor_root.as_deref() == Some(root);
            if !in_thread || thread_contains(thread, &post.uri) {
                continue;
            }
            let view = json!({
                "$type": THREAD_VIEW_POST,
                "post": self.viewer.post_view(post, self.local, fetched),
            });
            insert_reply(thread, parent, view);
        }
        self.mark_thread_likes(thread);
        Ok(())
    }

    fn mark_thread_likes(&self, node: &mut Value) {
        if self.local.likes.is_empty() || str_at(node, &["$type"]) != Some(THREAD_VIEW_POST) {
            return;
        }
        if let Some(post) = node.get_mut("post") {
            self.mark_like(post);
        }
        if let Some(parent) = node.get_mut("parent") {
            self.mark_thread_likes(parent);
        }
        if let Some(replies) = node.get_mut("replies").and_then(Value::as_array_mut) {
            for reply in replies {
                self.mark_thread_likes(reply);
            }
        }
    }
}

/// Hangs `ancestors` (the AppView's `thread` for the first ancestor that is
/// not fresh) above the topmost post of a [`Context::fresh_thread`] body.
pub fn attach_ancestors(body: &mut Value, ancestors: Value) {
    let Some(mut node) = body.get_mut("thread") else { return };
    while node.get("parent").is_some() {
        let Some(next) = node.get_mut("parent") else { return };
        node = next;
    }
    if let Some(node) = node.as_object_mut() {
        node.insert("parent".into(), ancestors);
    }
}

/// `feed`, the array every feed method returns.
fn feed_of(body: &mut Value) -> Result<&mut Vec<Value>, UnexpectedShape> {
    body.get_mut("feed").and_then(Value::as_array_mut).ok_or(UnexpectedShape("feed is not an array"))
}

/// Puts `view` first among the replies of the node whose post is `parent`.
fn insert_reply(node: &mut Value, parent: &str, view: Value) -> Option<Value> {
    if str_at(node, &["$type"]) != Some(THREAD_VIEW_POST) {
        return Some(view);
    }
    if str_at(node, &["post", "uri"]) == Some(parent) {
        let node = node.as_object_mut()?;
        let replies = node.entry("replies").or_insert_with(|| json!([]));
        if let Some(replies) = replies.as_array_mut() {
            replies.insert(0, view);
            return None;
        }
        return Some(view);
    }
    let mut view = Some(view);
    if let Some(replies) = node.get_mut("replies").and_then(Value::as_array_mut) {
        for reply in replies {
            let Some(v) = view.take() else { break };
            view = insert_reply(reply, parent, v);
        }
    }
    view
}

fn thread_contains(node: &Value, uri: &str) -> bool {
    str_at(node, &["post", "uri"]) == Some(uri)
        || node
            .get("replies")
            .and_then(Value::as_array)
            .is_some_and(|r| r.iter().any(|n| thread_contains(n, uri)))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

fn set_or_remove(view: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    match value {
        Some(v) => view.insert(key.to_owned(), v),
        None => view.remove(key),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:alice";
    const OTHER: &str = "did:plc:bob";
    // TIDs for 2024-01-01T00:00:01Z .. :03Z (micros 1704067201000000 ..).
    fn rev(second: u64) -> String {
        Tid::from_parts(1_704_067_200_000_000 + second * 1_000_000, 0).as_str().to_owned()
    }

    fn viewer(profile: Option<Value>) -> Viewer {
        Viewer {
            did: DID.into(),
            handle: "alice.test".into(),
            public_url: "https://pds.example".into(),
            profile,
        }
    }

    fn blob(cid: &str) -> Value {
        json!({"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/png", "size": 10})
    }

    fn profile_record() -> Value {
        json!({"$type": PROFILE, "displayName": "Alice New", "description": "fresh bio", "avatar": blob("bafyavatar")})
    }

    fn upstream_post(uri: &str, did: &str, indexed_at: &str) -> Value {
        json!({
            "uri": uri, "cid": "bafyup", "record": {"text": "old"}, "indexedAt": indexed_at,
            "author": {"did": did, "handle": "someone.test", "displayName": "Old Name", "avatar": "https://cdn/old"},
            "likeCount": 3,
        })
    }

    fn post_uri(rkey: &str) -> String {
        format!("at://{DID}/{POST}/{rkey}")
    }

    /// Runs `method` over `body` with the given records and parameters.
    fn check(
        method: Method,
        body: Value,
        local: &LocalRecords,
        params: &[(&str, &str)],
        fetched: &[Value],
    ) -> Value {
        check_with(method, body, local, params, fetched, Some(profile_record()))
    }

    fn check_with(
        method: Method,
        mut body: Value,
        local: &LocalRecords,
        params: &[(&str, &str)],
        fetched: &[Value],
        profile: Option<Value>,
    ) -> Value {
        let viewer = viewer(profile);
        let params: Vec<(String, String)> =
            params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let fetched: HashMap<String, Value> =
            fetched.iter().map(|p| (p["uri"].as_str().expect("uri").to_owned(), p.clone())).collect();
        let cx = Context { viewer: &viewer, local, params: &params };
        cx.apply(method, &mut body, &fetched).expect("expected shape");
        body
    }

    fn local_with(
        posts: &[(&str, u64, Value)],
        likes: &[(&str, u64, &str)],
        profile: Option<u64>,
    ) -> LocalRecords {
        let mut local = LocalRecords::default();
        let mut all: Vec<(u64, &str, String, Value)> = Vec::new();
        for (rkey, at, value) in posts {
            all.push((*at, POST, rkey.to_string(), value.clone()));
        }
        for (rkey, at, subject) in likes {
            all.push((*at, LIKE, rkey.to_string(), json!({"subject": {"uri": subject, "cid": "bafys"}})));
        }
        if let Some(at) = profile {
            all.push((at, PROFILE, "self".into(), profile_record()));
        }
        all.sort_by_key(|(at, ..)| *at);
        for (at, collection, rkey, value) in all {
            local.push(DID, collection, &rkey, format!("bafy{rkey}"), &rev(at), value);
        }
        local
    }

    fn text_post(text: &str) -> Value {
        json!({"$type": POST, "text": text, "createdAt": "2024-01-01T00:00:00.000Z"})
    }

    fn reply_post(text: &str, root: &str, parent: &str) -> Value {
        json!({"$type": POST, "text": text, "createdAt": "2024-01-01T00:00:00.000Z",
            "reply": {"root": {"uri": root, "cid": "bafyr"}, "parent": {"uri": parent, "cid": "bafyp"}}})
    }

    fn uris(feed: &Value) -> Vec<String> {
        feed["feed"]
            .as_array()
            .expect("feed")
            .iter()
            .map(|i| i["post"]["uri"].as_str().expect("uri").to_owned())
            .collect()
    }

    #[test]
    fn methods_are_recognised_by_nsid() {
        assert_eq!(Method::from_nsid("app.bsky.feed.getTimeline"), Some(Method::Timeline));
        assert_eq!(Method::from_nsid("app.bsky.actor.getProfiles"), Some(Method::Profiles));
        assert_eq!(Method::from_nsid("app.bsky.feed.getFeed"), None);
    }

    #[test]
    fn records_are_filed_by_kind_with_their_commit_time() {
        let local =
            local_with(&[("p1", 1, text_post("a"))], &[("l1", 2, "at://x/app.bsky.feed.post/y")], Some(3));
        assert_eq!(local.posts.len(), 1);
        assert_eq!(local.likes.len(), 1);
        assert_eq!(local.posts[0].uri, post_uri("p1"));
        assert_eq!(local.posts[0].indexed_at, "2024-01-01T00:00:01.000Z");
        assert_eq!(local.profile.as_ref().map(|p| p.indexed_at.as_str()), Some("2024-01-01T00:00:03.000Z"));
        let mut other = LocalRecords::default();
        other.push(DID, "app.bsky.graph.follow", "f", "bafy".into(), &rev(1), json!({}));
        other.push(DID, PROFILE, "notself", "bafy".into(), &rev(1), json!({}));
        other.push(DID, POST, "p", "bafy".into(), "not-a-tid", json!({}));
        assert!(other.is_empty());
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unindexed_write() {
        let local = local_with(&[("p1", 2, text_post("a"))], &[], Some(5));
        let now = 1_704_067_200_000_000 + 10 * 1_000_000;
        assert_eq!(local.lag_ms(now), Some(8000));
        assert_eq!(LocalRecords::default().lag_ms(now), None);
    }

    #[test]
    fn timeline_gets_new_posts_on_top_with_the_local_author() {
        let local = local_with(&[("p1", 1, text_post("first")), ("p2", 2, text_post("second"))], &[], None);
        let body = json!({"cursor": "c1", "feed": [
            {"post": upstream_post("at://did:plc:bob/app.bsky.feed.post/old", OTHER, "2023-12-31T00:00:00.000Z")},
        ]});
        let out = check(Method::Timeline, body, &local, &[("limit", "30")], &[]);
        assert_eq!(
            uris(&out),
            vec![post_uri("p2"), post_uri("p1"), "at://did:plc:bob/app.bsky.feed.post/old".to_owned()]
        );
        assert_eq!(out["cursor"], "c1", "other fields stay");
        let view = &out["feed"][0]["post"];
        assert_eq!(view["cid"], "bafyp2");
        assert_eq!(view["record"]["text"], "second");
        assert_eq!(view["indexedAt"], "2024-01-01T00:00:02.000Z");
        for count in ["likeCount", "replyCount", "repostCount", "quoteCount"] {
            assert_eq!(view[count], 0, "{count}");
        }
        assert_eq!(
            view["author"],
            json!({"did": DID, "handle": "alice.test", "displayName": "Alice New",
                "avatar": "https://pds.example/xrpc/com.atproto.sync.getBlob?did=did:plc:alice&cid=bafyavatar"})
        );
    }

    #[test]
    fn timeline_posts_slot_in_by_time_and_not_into_older_pages() {
        let local = local_with(&[("p1", 5, text_post("x"))], &[], None);
        let page = || {
            json!({"feed": [
                {"post": upstream_post("at://b/app.bsky.feed.post/newer", OTHER, "2024-01-01T00:00:09.000Z")},
                {"post": upstream_post("at://b/app.bsky.feed.post/older", OTHER, "2024-01-01T00:00:01.000Z")},
            ]})
        };
        let out = check(Method::Timeline, page(), &local, &[], &[]);
        assert_eq!(uris(&out)[1], post_uri("p1"), "between the newer and the older item");
        // A later page whose items are all older: the post belongs to an earlier page.
        let older = json!({"feed": [
            {"post": upstream_post("at://b/app.bsky.feed.post/o1", OTHER, "2024-01-01T00:00:02.000Z")},
        ]});
        let out = check(Method::Timeline, older.clone(), &local, &[("cursor", "abc")], &[]);
        assert_eq!(out, older);
        // A full page of items newer than the post: it belongs to a later page.
        let newer = json!({"feed": [
            {"post": upstream_post("at://b/app.bsky.feed.post/n1", OTHER, "2024-01-01T00:00:09.000Z")},
        ]});
        assert_eq!(check(Method::Timeline, newer.clone(), &local, &[], &[]), newer);
    }

    #[test]
    fn a_post_already_indexed_is_not_repeated() {
        let local = local_with(&[("p1", 5, text_post("x"))], &[], None);
        let body =
            json!({"feed": [{"post": upstream_post(&post_uri("p1"), DID, "2024-01-01T00:00:05.000Z")}]});
        let out = check(Method::Timeline, body, &local, &[], &[]);
        assert_eq!(uris(&out), vec![post_uri("p1")]);
    }

    #[test]
    fn author_feed_only_for_the_requester_and_by_filter() {
        let local = local_with(
            &[
                ("p1", 1, text_post("top")),
                ("r1", 2, reply_post("re", "at://b/app.bsky.feed.post/t", "at://b/app.bsky.feed.post/t")),
            ],
            &[],
            Some(3),
        );
        let body = json!({"feed": [{"post": upstream_post("at://did:plc:alice/app.bsky.feed.post/old", DID, "2023-01-01T00:00:00.000Z")}]});
        let out = check(Method::AuthorFeed, body.clone(), &local, &[("actor", "did:plc:bob")], &[]);
        assert_eq!(out, body, "someone else's feed is untouched");
        let out = check(Method::AuthorFeed, body.clone(), &local, &[("actor", "Alice.Test")], &[]);
        assert_eq!(uris(&out).len(), 3, "by handle too");
        assert_eq!(
            out["feed"][2]["post"]["author"]["displayName"], "Alice New",
            "the profile over old items"
        );
        assert!(out["feed"][2]["post"]["author"].get("avatar").is_some());
        let out = check(
            Method::AuthorFeed,
            body.clone(),
            &local,
            &[("actor", DID), ("filter", "posts_no_replies")],
            &[],
        );
        assert_eq!(uris(&out)[0], post_uri("p1"));
        assert_eq!(uris(&out).len(), 2);
        let out = check(
            Method::AuthorFeed,
            body.clone(),
            &local,
            &[("actor", DID), ("filter", "posts_with_media")],
            &[],
        );
        assert_eq!(uris(&out).len(), 1);
        // An empty feed (the first post ever) still gets the post.
        let out = check(Method::AuthorFeed, json!({"feed": []}), &local, &[("actor", DID)], &[]);
        assert_eq!(uris(&out), vec![post_uri("r1"), post_uri("p1")]);
    }

    #[test]
    fn pinned_items_keep_their_place() {
        let local = local_with(&[("p1", 5, text_post("x"))], &[], None);
        let body = json!({"feed": [
            {"post": upstream_post(&post_uri("pin"), DID, "2020-01-01T00:00:00.000Z"), "reason": {"$type": REASON_PIN}},
            {"post": upstream_post(&post_uri("old"), DID, "2023-01-01T00:00:00.000Z")},
        ]});
        let out = check(Method::AuthorFeed, body, &local, &[("actor", DID)], &[]);
        assert_eq!(uris(&out), vec![post_uri("pin"), post_uri("p1"), post_uri("old")]);
    }

    #[test]
    fn profile_fields_come_from_the_fresh_record_and_dropped_ones_go() {
        let local = local_with(&[], &[], Some(1));
        let body = json!({"did": DID, "handle": "alice.test", "displayName": "Old", "banner": "https://cdn/banner",
            "description": "old bio", "followersCount": 7});
        let out = check(Method::Profile, body, &local, &[("actor", DID)], &[]);
        assert_eq!(out["displayName"], "Alice New");
        assert_eq!(out["description"], "fresh bio");
        assert_eq!(
            out["avatar"],
            "https://pds.example/xrpc/com.atproto.sync.getBlob?did=did:plc:alice&cid=bafyavatar"
        );
        assert!(out.get("banner").is_none(), "the record has no banner any more");
        assert_eq!(out["followersCount"], 7);
        let other = json!({"did": OTHER, "displayName": "Bob"});
        assert_eq!(check(Method::Profile, other.clone(), &local, &[], &[]), other);
        // No fresh profile record: nothing to change.
        let mine = json!({"did": DID, "displayName": "Old"});
        assert_eq!(
            check(
                Method::Profile,
                mine.clone(),
                &local_with(&[("p", 1, text_post("x"))], &[], None),
                &[],
                &[]
            ),
            mine
        );
    }

    #[test]
    fn profiles_update_only_the_requester() {
        let local = local_with(&[], &[], Some(1));
        let body =
            json!({"profiles": [{"did": OTHER, "displayName": "Bob"}, {"did": DID, "displayName": "Old"}]});
        let out = check(Method::Profiles, body, &local, &[], &[]);
        assert_eq!(out["profiles"][0], json!({"did": OTHER, "displayName": "Bob"}));
        assert_eq!(out["profiles"][1]["displayName"], "Alice New");
        assert_eq!(out["profiles"][1]["description"], "fresh bio");
    }

    #[test]
    fn thread_replies_go_under_their_parent() {
        let root = "at://did:plc:bob/app.bsky.feed.post/root";
        let child = "at://did:plc:bob/app.bsky.feed.post/child";
        let local = local_with(
            &[
                ("r1", 1, reply_post("to root", root, root)),
                ("r2", 2, reply_post("to child", root, child)),
                ("r3", 3, reply_post("to my reply", root, &post_uri("r2"))),
                (
                    "x",
                    4,
                    reply_post("elsewhere", "at://z/app.bsky.feed.post/z", "at://z/app.bsky.feed.post/z"),
                ),
            ],
            &[],
            None,
        );
        let body = json!({"thread": {
            "$type": THREAD_VIEW_POST,
            "post": upstream_post(root, OTHER, "2023-01-01T00:00:00.000Z"),
            "replies": [
                {"$type": THREAD_VIEW_POST, "post": upstream_post(child, OTHER, "2023-01-01T00:00:00.000Z"), "replies": []},
                {"$type": "app.bsky.feed.defs#blockedPost", "uri": "at://c/app.bsky.feed.post/c", "blocked": true},
            ],
        }});
        let out = check(Method::PostThread, body, &local, &[("uri", root)], &[]);
        let replies = out["thread"]["replies"].as_array().expect("replies");
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0]["post"]["uri"], post_uri("r1"), "new replies first");
        assert_eq!(replies[0]["$type"], THREAD_VIEW_POST);
        assert_eq!(replies[1]["post"]["uri"], child);
        let under_child = &replies[1]["replies"][0];
        assert_eq!(under_child["post"]["uri"], post_uri("r2"));
        assert_eq!(under_child["replies"][0]["post"]["uri"], post_uri("r3"), "a reply to a fresh reply");
        assert!(!out.to_string().contains("elsewhere"));
    }

    #[test]
    fn thread_opened_at_a_reply_takes_replies_of_its_root() {
        let root = "at://did:plc:bob/app.bsky.feed.post/root";
        let child = "at://did:plc:bob/app.bsky.feed.post/child";
        let local = local_with(&[("r1", 1, reply_post("hi", root, child))], &[], None);
        let mut anchor = upstream_post(child, OTHER, "2023-01-01T00:00:00.000Z");
        anchor["record"] = reply_post("child", root, root);
        let body = json!({"thread": {"$type": THREAD_VIEW_POST, "post": anchor}});
        let out = check(Method::PostThread, body, &local, &[], &[]);
        assert_eq!(out["thread"]["replies"][0]["post"]["uri"], post_uri("r1"));
        let not_found =
            json!({"thread": {"$type": "app.bsky.feed.defs#notFoundPost", "uri": root, "notFound": true}});
        assert_eq!(check(Method::PostThread, not_found.clone(), &local, &[], &[]), not_found);
    }

    #[test]
    fn a_fresh_post_the_appview_cannot_find_gets_a_local_thread() {
        let root = "at://did:plc:bob/app.bsky.feed.post/root";
        let local = local_with(
            &[
                ("a", 1, reply_post("to bob", root, root)),
                ("b", 2, reply_post("to myself", root, &post_uri("a"))),
                ("c", 3, reply_post("under b", root, &post_uri("b"))),
            ],
            &[],
            None,
        );
        let viewer = viewer(None);
        let cx = Context { viewer: &viewer, local: &local, params: &[] };
        let none = HashMap::new();
        let (mut body, ancestor) = cx.fresh_thread(&post_uri("b"), &none).expect("fresh");
        let thread = &body["thread"];
        assert_eq!(thread["$type"], THREAD_VIEW_POST);
        assert_eq!(thread["post"]["uri"], post_uri("b"));
        assert_eq!(thread["replies"][0]["post"]["uri"], post_uri("c"), "fresh replies below");
        assert_eq!(thread["parent"]["post"]["uri"], post_uri("a"), "fresh parents above");
        assert!(thread["parent"].get("parent").is_none());
        assert_eq!(ancestor.as_deref(), Some(root), "the rest is the AppView's");
        let above = json!({"$type": THREAD_VIEW_POST, "post": upstream_post(root, OTHER, "2023-01-01T00:00:00.000Z")});
        attach_ancestors(&mut body, above.clone());
        assert_eq!(body["thread"]["parent"]["parent"], above);
        // A top-level post has nothing above it; someone else's post is not ours to build.
        let local = local_with(&[("t", 1, text_post("top"))], &[], None);
        let cx = Context { viewer: &viewer, local: &local, params: &[] };
        let (body, ancestor) = cx.fresh_thread(&post_uri("t"), &none).expect("fresh");
        assert!(body["thread"].get("parent").is_none());
        assert_eq!(ancestor, None);
        assert!(cx.fresh_thread(root, &none).is_none());
    }

    #[test]
    fn likes_go_atop_the_likes_feed_and_mark_posts_as_liked() {
        let liked = "at://did:plc:bob/app.bsky.feed.post/liked";
        let liked2 = "at://did:plc:bob/app.bsky.feed.post/liked2";
        let unknown = "at://did:plc:bob/app.bsky.feed.post/gone";
        let local = local_with(&[], &[("l1", 1, liked), ("l2", 2, unknown), ("l3", 3, liked2)], None);
        let cx_params = [("actor", DID)];
        let viewer = viewer(None);
        let params: Vec<(String, String)> =
            cx_params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cx = Context { viewer: &viewer, local: &local, params: &params };
        assert_eq!(
            cx.posts_to_fetch(Method::ActorLikes),
            vec![liked.to_owned(), unknown.to_owned(), liked2.to_owned()]
        );
        let body = json!({"feed": [{"post": upstream_post("at://b/app.bsky.feed.post/before", OTHER, "2023-01-01T00:00:00.000Z")}]});
        let fetched = [
            upstream_post(liked, OTHER, "2023-05-01T00:00:00.000Z"),
            upstream_post(liked2, OTHER, "2023-05-01T00:00:00.000Z"),
        ];
        let out = check(Method::ActorLikes, body.clone(), &local, &cx_params, &fetched);
        assert_eq!(
            uris(&out),
            vec![liked2.to_owned(), liked.to_owned(), "at://b/app.bsky.feed.post/before".to_owned()]
        );
        assert_eq!(out["feed"][0]["post"]["viewer"]["like"], format!("at://{DID}/{LIKE}/l3"));
        assert_eq!(out["feed"][0]["post"]["likeCount"], 4, "the AppView's 3 and this one");
        // Not on later pages, and not in someone else's likes.
        assert_eq!(
            check(Method::ActorLikes, body.clone(), &local, &[("actor", DID), ("cursor", "x")], &fetched),
            body
        );
        assert_eq!(check(Method::ActorLikes, body.clone(), &local, &[("actor", OTHER)], &fetched), body);
        // A liked post in the timeline shows as liked.
        let timeline = json!({"feed": [{"post": upstream_post(liked, OTHER, "2023-05-01T00:00:00.000Z")}]});
        let out = check(Method::Timeline, timeline, &local, &[], &[]);
        assert_eq!(out["feed"][0]["post"]["viewer"]["like"], format!("at://{DID}/{LIKE}/l1"));
        assert_eq!(out["feed"][0]["post"]["likeCount"], 4);
    }

    #[test]
    fn embeds_become_views_with_blob_urls() {
        let quoted = "at://did:plc:bob/app.bsky.feed.post/q";
        let mut with_images = text_post("pics");
        with_images["embed"] = json!({"$type": "app.bsky.embed.images", "images": [
            {"image": blob("bafyimg"), "alt": "a cat", "aspectRatio": {"width": 4, "height": 3}}]});
        let mut with_quote = text_post("quote");
        with_quote["embed"] = json!({"$type": "app.bsky.embed.recordWithMedia",
            "record": {"$type": "app.bsky.embed.record", "record": {"uri": quoted, "cid": "bafyq"}},
            "media": {"$type": "app.bsky.embed.external", "external": {"uri": "https://x", "title": "X", "description": "d", "thumb": blob("bafythumb")}}});
        let mut with_missing = text_post("lost quote");
        with_missing["embed"] = json!({"$type": "app.bsky.embed.record", "record": {"uri": "at://did:plc:bob/app.bsky.feed.post/gone", "cid": "bafyg"}});
        let local =
            local_with(&[("i", 1, with_images), ("q", 2, with_quote), ("m", 3, with_missing)], &[], None);
        let viewer = viewer(None);
        let cx = Context { viewer: &viewer, local: &local, params: &[] };
        assert_eq!(
            cx.posts_to_fetch(Method::Timeline),
            vec![quoted.to_owned(), "at://did:plc:bob/app.bsky.feed.post/gone".to_owned()]
        );
        let out = check_with(
            Method::Timeline,
            json!({"feed": []}),
            &local,
            &[],
            &[upstream_post(quoted, OTHER, "2023-01-01T00:00:00.000Z")],
            None,
        );
        let url =
            |cid: &str| format!("https://pds.example/xrpc/com.atproto.sync.getBlob?did={DID}&cid={cid}");
        let images = &out["feed"][2]["post"]["embed"];
        assert_eq!(images["$type"], "app.bsky.embed.images#view");
        assert_eq!(
            images["images"][0],
            json!({"thumb": url("bafyimg"), "fullsize": url("bafyimg"), "alt": "a cat", "aspectRatio": {"width": 4, "height": 3}})
        );
        let rwm = &out["feed"][1]["post"]["embed"];
        assert_eq!(rwm["$type"], "app.bsky.embed.recordWithMedia#view");
        assert_eq!(rwm["media"]["external"]["thumb"], url("bafythumb"));
        assert_eq!(rwm["record"]["record"]["$type"], "app.bsky.embed.record#viewRecord");
        assert_eq!(rwm["record"]["record"]["uri"], quoted);
        assert_eq!(rwm["record"]["record"]["value"]["text"], "old");
        let missing = &out["feed"][0]["post"]["embed"];
        assert_eq!(missing["record"]["$type"], "app.bsky.embed.record#viewNotFound");
        assert_eq!(
            out["feed"][0]["post"]["author"],
            json!({"did": DID, "handle": "alice.test"}),
            "no profile record"
        );
    }

    #[test]
    fn unexpected_shapes_are_reported() {
        let local = local_with(&[("p", 1, text_post("x"))], &[], Some(2));
        let viewer = viewer(None);
        let cx = Context { viewer: &viewer, local: &local, params: &[] };
        let none = HashMap::new();
        for (method, mut body) in [
            (Method::Timeline, json!({"feed": {}})),
            (Method::ActorLikes, json!([])),
            (Method::Profiles, json!({"profiles": "x"})),
            (Method::Profile, json!("x")),
            (Method::PostThread, json!({})),
        ] {
            assert!(cx.apply(method, &mut body, &none).is_err(), "{method:?} {body}");
        }
    }
}
