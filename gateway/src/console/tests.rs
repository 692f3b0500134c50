use super::{ASSETS, find, immutable};

#[test]
fn the_root_serves_the_embedded_index_and_its_assets_exist() {
    let index = find("/").expect("the console's index.html is embedded");
    assert_eq!(index.content_type, "text/html; charset=utf-8");
    assert!(!immutable(index));
    let html = std::str::from_utf8(index.bytes).unwrap();
    // Every script and style sheet the page names is embedded and cacheable for good.
    let mut named = 0;
    for attribute in ["src=\"", "href=\""] {
        for piece in html.split(attribute).skip(1) {
            let url = piece.split('"').next().unwrap();
            if url.starts_with("/assets/") {
                let asset = find(url).unwrap_or_else(|| panic!("{url} is not embedded"));
                assert!(immutable(asset));
                named += 1;
            }
        }
    }
    assert!(named >= 1, "index.html names no script: {html}");
    assert!(ASSETS.iter().all(|asset| asset.path.starts_with('/')));
    assert!(find("/admin/api/models").is_none());
}
