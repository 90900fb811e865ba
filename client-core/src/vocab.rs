//! The controlled vocabularies of peer-support records, in one place.
//!
//! They match the field scenarios the product lead provides (`shared/data/generate.py`);
//! the server, the reports and the bindings all read them from here.

/// How a contact happened.
pub const MODES: &[&str] = &["in_person", "phone", "video", "text", "group"];
/// Where a contact happened.
pub const SETTINGS: &[&str] = &[
    "community",
    "acute_inpatient",
    "housing",
    "employment",
    "home",
    "online",
];
/// The kinds of peer support given in a contact.
pub const ACTIVITIES: &[&str] = &["support", "advocacy", "education", "navigation"];
/// Goals a person is working on.
pub const GOALS: &[&str] = &[
    "housing",
    "employment",
    "finances",
    "social_connection",
    "physical_health",
    "substance_use",
    "coping_with_stress",
    "rights_and_advocacy",
    "education",
    "family_relationships",
];
/// Services a person was referred to.
pub const REFERRALS: &[&str] = &[
    "housing_service",
    "employment_support",
    "benefits_advice",
    "primary_care",
    "crisis_team",
    "addiction_service",
    "peer_group",
    "legal_aid",
    "food_bank",
];
/// Housing situation reported at a check-in.
pub const HOUSING: &[&str] = &["stable", "temporary", "homeless"];
/// Employment situation reported at a check-in.
pub const EMPLOYMENT: &[&str] = &[
    "employed",
    "training",
    "volunteering",
    "unemployed",
    "not_seeking",
];
/// The five peer roles a worker can hold.
pub const ROLES: &[&str] = &[
    "peer_support_worker",
    "peer_advocate",
    "peer_educator",
    "peer_navigator",
    "peer_advisor",
];

/// Number of items in the wellbeing scale of a check-in.
pub const WELLBEING_ITEMS: usize = 7;
/// Lowest and highest score of every 1..5 scale.
pub const SCORE_RANGE: std::ops::RangeInclusive<i64> = 1..=5;
